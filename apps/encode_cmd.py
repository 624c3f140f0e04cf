"""`fpdm encode IMAGES OUT --vae DIR`: flags -> `fpdm.io.encode.encode_folder` -> the next command to run.

The encoding itself (an image folder -> SD-VAE latents in the official DiT/FPDM feature format) lives in the
core; top-level imports stay torch-free (`fpdm encode --help` must not load torch).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from fpdm.apps.cli import add_device_option
from fpdm.errors import UsageError

Handler = Callable[[argparse.Namespace], int]
VAE_HELP = (
    "a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors) "
    "or a pipeline folder with vae/"
)
DEFAULT_SCALE = 0.18215  # data.scale_factor's default: other VAEs need it set when training


def encode_command(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("images", help="image folder: class subfolders of images, or images directly")
    parser.add_argument("out", help="folder to hold NAME_features/ and NAME_labels/ (created if missing)")
    parser.add_argument("--vae", metavar="DIR", help=f"the VAE (required): {VAE_HELP}")
    parser.add_argument(
        "--image-size", type=int, default=256, metavar="PIXELS", help="center-crop and resize to this side"
    )
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="images encoded at once")
    parser.add_argument("--name", help="feature set name (default: the image folder's name)")
    add_device_option(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--sample",
        dest="sample",
        action="store_true",
        default=True,
        help="store a draw from the encoder's Gaussian (the official extraction does this)",
    )
    mode.add_argument("--mean", dest="sample", action="store_false", help="store the encoder's mean instead")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the --sample draws")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        if args.vae is None:
            raise UsageError(f"--vae is required: {VAE_HELP}")
        from fpdm.io.encode import encode_folder

        result = encode_folder(
            args.images,
            args.out,
            vae=args.vae,
            image_size=args.image_size,
            batch_size=args.batch_size,
            sample=args.sample,
            seed=args.seed,
            name=args.name,
            device=args.device,
            progress=not args.no_progress,
        )
        c, h, w = result.latent_shape
        scale = "" if result.scale_factor == DEFAULT_SCALE else f" --set data.scale_factor={result.scale_factor}"
        print(
            f"{result.count} latents of shape ({c}, {h}, {w}) in {result.features}, labels in {result.labels} "
            f"({len(result.class_names) or 'no'} classes)"
        )
        print(
            f"train: fpdm train --set data.name=latents --set data.path={result.features.parent} "
            f"--set data.channels={c} --set data.image_size={h}{scale}"
        )
        return 0

    return run
