"""`fpdm encode IMAGES OUT --vae DIR`: an image folder -> SD-VAE latents in the official DiT/FPDM feature
format, and the helper `fpdm sample --vae` uses to decode what a latent model generates."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fpdm.data.images import image_files, load_image
from fpdm.errors import UsageError
from fpdm.data.latents import FEATURES, INFO, LABELS
from fpdm.build import resolve_device
from fpdm.models.vae import AutoencoderKL
from fpdm.io.vae_weights import EXPECTED, load_vae

Handler = Callable[[argparse.Namespace], int]


def encode_command(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("images", help="image folder: class subfolders of images, or images directly")
    parser.add_argument("out", help="folder to hold NAME_features/ and NAME_labels/ (created if missing)")
    parser.add_argument("--vae", help=f"the VAE: {EXPECTED}")
    parser.add_argument("--image-size", type=int, default=256, help="center-crop and resize to this side (pixels)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--name", help="feature set name (default: the image folder's name)")
    parser.add_argument("--device", default="auto")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sample", dest="sample", action="store_true", default=True,
                      help="store a sample of the encoder's Gaussian (default; the official extraction does this)")
    mode.add_argument("--mean", dest="sample", action="store_false", help="store the encoder's mean instead")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --sample draws")
    parser.add_argument("--no-progress", action="store_true")

    def run(args: argparse.Namespace) -> int:
        if args.vae is None:
            raise UsageError(f"--vae is required: {EXPECTED}")
        if args.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        root = Path(args.images).expanduser()
        if not root.is_dir():
            raise UsageError(f"image folder {root} {'is not a directory' if root.exists() else 'does not exist'}")
        name = args.name or root.resolve().name
        if not name or "/" in name or name.startswith("."):
            raise UsageError(f"--name {name!r} must be a plain folder-name prefix (no '/', not starting with '.')")
        device = resolve_device(args.device)
        vae = load_vae(args.vae, device=device)
        f, channels = vae.config.downscale, vae.config.in_channels
        if args.image_size < f or args.image_size % f:
            raise UsageError(f"--image-size {args.image_size} must be a positive multiple of {f}, the VAE's downscale")
        if channels not in (1, 3):
            raise UsageError(f"the VAE takes {channels}-channel images; only 1 (gray) or 3 (RGB) can be read")
        files, labels, class_names = image_files(root)
        out = Path(args.out).expanduser()
        taken = [p for p in (out / f"{name}{FEATURES}", out / f"{name}{LABELS}") if p.exists()]
        if taken:
            raise UsageError(f"{taken[0]} already exists; choose another --name or OUT")
        info = {"class_names": class_names, "scale_factor": vae.config.scaling_factor, "image_size": args.image_size,
                "vae": str(Path(args.vae).expanduser().resolve()), "sample": args.sample}
        shape = _encode_folder(vae, files, labels, out, name, info, size=args.image_size, batch_size=args.batch_size,
                               sample=args.sample, seed=args.seed, device=device, progress=not args.no_progress)
        c, h = shape[0], shape[1]
        scale = "" if vae.config.scaling_factor == 0.18215 else f" --set data.scale_factor={vae.config.scaling_factor}"
        print(f"{len(files)} latents of shape ({c}, {h}, {h}) in {out / (name + FEATURES)}, labels in "
              f"{out / (name + LABELS)} ({len(class_names) or 'no'} classes)")
        print(f"train: fpdm train --set data.name=latents --set data.path={out} --set data.channels={c} "
              f"--set data.image_size={h}{scale}")
        return 0

    return run


def _encode_folder(vae: AutoencoderKL, files: list[Path], labels: list[int], out: Path, name: str,
                   info: dict[str, Any], *, size: int, batch_size: int, sample: bool, seed: int,
                   device: torch.device, progress: bool) -> tuple[int, int, int]:
    """Encode `files` into a temporary folder inside `out`, then move the finished pieces into place
    (labels and info first, features last: a reader never finds a features folder that is still filling)."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / f"{name}{FEATURES}").mkdir(parents=True)
    (tmp / f"{name}{LABELS}").mkdir()
    generator = torch.Generator(device=device).manual_seed(seed)
    channels = vae.config.in_channels
    shape = (0, 0, 0)
    try:
        with tqdm(total=len(files), unit="img", disable=not progress) as bar:
            for first in range(0, len(files), batch_size):
                batch = files[first : first + batch_size]
                pixels = torch.stack([load_image(p, size, channels) for p in batch])  # (B, C, S, S) uint8
                x = pixels.to(device, torch.float32).div_(127.5).sub_(1.0)  # [-1, 1]
                with torch.no_grad():
                    z = vae.encode_latents(x, sample=sample, generator=generator).cpu()  # (B, c, S/f, S/f)
                shape = tuple(z.shape[1:])
                for k in range(len(batch)):
                    index = first + k
                    np.save(tmp / f"{name}{FEATURES}" / f"{index}.npy", z[k : k + 1].numpy())  # (1, c, h, h)
                    np.save(tmp / f"{name}{LABELS}" / f"{index}.npy", np.array([labels[index]], dtype=np.int64))
                bar.update(len(batch))
        (tmp / f"{name}{INFO}").write_text(json.dumps(info, indent=2))
        for part in (f"{name}{LABELS}", f"{name}{INFO}", f"{name}{FEATURES}"):
            os.replace(tmp / part, out / part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return shape  # type: ignore[return-value]
