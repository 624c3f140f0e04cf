"""What `fpdm eval` compares: image folders, Fashion-MNIST splits, and samples drawn from a checkpoint.

Every source becomes uint8 (N, C, H, W), the form torch-fidelity hands its feature extractors, plus a short
description for the report. Bad input is a one-line `UsageError`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fpdm.config import DataConfig
from fpdm.data.images import IMAGE_EXTENSIONS, fashion_mnist
from fpdm.errors import UsageError
from fpdm.eval.features import to_uint8

FASHION_MNIST_NAMES = ("fashion_mnist", "fashion-mnist", "fmnist")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclasses.dataclass(frozen=True)
class ImageSet:
    images: Tensor  # (N, C, H, W) uint8
    source: str  # for the report: where the images came from
    details: dict[str, Any]

    def describe(self) -> str:
        n, c, h, w = self.images.shape
        return f"{n} images {'gray' if c == 1 else 'RGB'} {w}x{h} from {self.source}"


def image_paths(folder: Path) -> list[Path]:
    """The images of an `fpdm sample` output folder (its images/, not grid.png), else those directly in `folder`."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder of images")
    if (folder / "stats.json").is_file() and (folder / "images").is_dir():
        folder = folder / "images"
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not found:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return found


def load_folder(folder: str | Path) -> ImageSet:
    """All images of a folder as uint8 (N, C, H, W); they must share one size and be all gray or all color."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder).expanduser()
    paths = image_paths(folder)
    arrays: list[np.ndarray] = []
    first: tuple[tuple[int, int], bool] | None = None
    for path in paths:
        try:
            with Image.open(path) as im:
                gray = im.mode in GRAY_MODES
                array = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)
                size = im.size
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UsageError(f"cannot read image {path}: {str(exc).splitlines()[0]}") from None
        if first is None:
            first = (size, gray)
        elif size != first[0]:
            raise UsageError(f"{folder} mixes image sizes: {paths[0].name} is {first[0][0]}x{first[0][1]}, "
                             f"{path.name} is {size[0]}x{size[1]}")
        elif gray != first[1]:
            raise UsageError(f"{folder} mixes grayscale and color images ({paths[0].name} vs {path.name})")
        arrays.append(array[..., None] if gray else array)  # (H, W, C)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    return ImageSet(images, str(folder), {"kind": "folder", "path": str(folder)})


def load_reference(name: str, *, split: str, data_dir: str | None, limit: int | None, seed: int) -> ImageSet:
    """`fashion_mnist` (the `split`, padded to 32x32 like fpdm's training data) or a folder of images;
    `limit` keeps a seeded random subset."""
    if name.lower() in FASHION_MNIST_NAMES:
        images, _ = fashion_mnist(DataConfig(path=data_dir, split=split, class_conditional=False)).tensors()
        ref = ImageSet(to_uint8(images), f"Fashion-MNIST {split} split (28x28 padded to 32x32)",
                       {"kind": "fashion_mnist", "split": split})
    else:
        if not Path(name).expanduser().exists():
            raise UsageError(f"--ref {name}: not a folder and not a known dataset (known: fashion_mnist)")
        ref = load_folder(name)
    if limit is not None and limit < ref.images.shape[0]:
        keep = torch.randperm(ref.images.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
        ref = dataclasses.replace(ref, images=ref.images[keep.sort().values],
                                  source=f"{ref.source}, a seeded random {limit} of {ref.images.shape[0]}")
    return ref


def sample_checkpoint(args: argparse.Namespace) -> ImageSet:
    """Draw args.n samples from a checkpoint with `fpdm sample`'s choices (steps, budget, sampler, ...)."""
    from fpdm.diffusion.sampling import generate

    from fpdm.apps.sampling_setup import load_for_sampling, names

    job = load_for_sampling(args, args.input)
    if job.config.data.name == "latents":
        raise UsageError("fpdm eval samples pixel-space models; decode latent samples with fpdm sample --vae, "
                         "then evaluate the images folder")
    model, ckpt = job.model, job.ckpt
    labels = list(range(model.num_classes)) or None  # every class in turn: the reference splits are balanced
    shape = (model.in_channels, model.input_size, model.input_size)
    print(f"sampling {args.n} images from {ckpt.path} (step {ckpt.step}) ...", flush=True)
    result = generate(model, job.parts.diffusion, n=args.n, batch_size=args.batch_size, seed=args.seed,
                      labels=labels, shape=shape, cfg_scale=args.cfg_scale, cfg_channels=args.cfg_channels,
                      clip_x0=args.clip_x0, device=job.device, **job.generate_options())
    blocks = result.blocks.double().mean().item()
    details = {"kind": "checkpoint", "checkpoint": str(ckpt.path), "step": ckpt.step, "ema": args.ema,
               "solver": job.solver_name, "seed": args.seed, "blocks_per_sample": blocks, **names(args),
               "sampling_seconds": result.seconds}
    source = (f"{ckpt.path} (step {ckpt.step}), {args.steps} {args.sampler} steps, "
              f"{blocks:.1f} blocks/sample, seed {args.seed}")
    return ImageSet(to_uint8(result.images), source, details)
