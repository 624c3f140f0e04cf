"""What an evaluation compares: image folders, Fashion-MNIST splits, image tensors and samples drawn from a model.

Every source becomes uint8 (N, C, H, W), the form torch-fidelity hands its feature extractors, plus a short
description for the report. Bad input is a one-line `UsageError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fpdm.config import DataConfig
from fpdm.data.images import IMAGE_EXTENSIONS, fashion_mnist, to_uint8
from fpdm.errors import UsageError
from fpdm.io.packed import is_packed

if TYPE_CHECKING:
    from fpdm.config import SampleConfig
    from fpdm.pipeline import Pipeline

FASHION_MNIST_NAMES = ("fashion_mnist", "fashion-mnist", "fmnist")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclasses.dataclass(frozen=True)
class ImageSet:
    images: Tensor  # (N, C, H, W) uint8
    source: str  # for the report: where the images came from
    details: dict[str, Any]


def is_fashion_mnist(name: str) -> bool:
    return name.lower() in FASHION_MNIST_NAMES


def is_model_path(path: Path) -> bool:
    """A run folder (its loss.png is no sample), a checkpoint folder, a packed model folder, or a file: anything
    but a plain folder of images is a model to sample from."""
    if not path.is_dir():
        return True
    return (path / "checkpoints").is_dir() or (path / "meta.json").is_file() or is_packed(path)


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
            raise UsageError(
                f"{folder} mixes image sizes: {paths[0].name} is {first[0][0]}x{first[0][1]}, "
                f"{path.name} is {size[0]}x{size[1]}"
            )
        elif gray != first[1]:
            raise UsageError(f"{folder} mixes grayscale and color images ({paths[0].name} vs {path.name})")
        arrays.append(array[..., None] if gray else array)  # (H, W, C)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    return ImageSet(images, str(folder), {"kind": "folder", "path": str(folder)})


def from_tensor(images: Tensor) -> ImageSet:
    """Float images (N, C, H, W) in [-1, 1] (what `Pipeline.sample` returns), or uint8 ones, as an ImageSet.
    Floats map to uint8 exactly as `fpdm sample` writes its PNGs, so a tensor and its PNG folder score alike."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UsageError(f"sample images must be (N, C, H, W) with 1 or 3 channels, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise UsageError(f"sample images must be float in [-1, 1] or uint8, got {images.dtype}")
        if not bool(torch.isfinite(images).all()):
            raise UsageError("sample images hold NaN or inf")
        images = to_uint8(images.detach().float().cpu())
    return ImageSet(images.cpu().contiguous(), f"a tensor of {images.shape[0]} images", {"kind": "tensor"})


def load_reference(name: str, *, split: str, data_dir: str | None, limit: int | None, seed: int) -> ImageSet:
    """`fashion_mnist` (the `split`, padded to 32x32 like fpdm's training data) or a folder of images;
    `limit` keeps a seeded random subset."""
    if is_fashion_mnist(name):
        images, _ = fashion_mnist(DataConfig(path=data_dir, split=split, class_conditional=False)).tensors()
        ref = ImageSet(
            to_uint8(images),
            f"Fashion-MNIST {split} split (28x28 padded to 32x32)",
            {"kind": "fashion_mnist", "split": split},
        )
    else:
        if not Path(name).expanduser().exists():
            raise UsageError(f"--ref {name}: not a folder and not a known dataset (known: fashion_mnist)")
        ref = load_folder(name)
    if limit is not None and limit < ref.images.shape[0]:
        keep = torch.randperm(ref.images.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
        ref = dataclasses.replace(
            ref,
            images=ref.images[keep.sort().values],
            source=f"{ref.source}, a seeded random {limit} of {ref.images.shape[0]}",
        )
    return ref


def sample_images(
    pipeline: Pipeline,
    *,
    n: int,
    batch_size: int,
    seed: int,
    sample: SampleConfig | None,
    progress: bool,
    log: Callable[[str], None],
) -> ImageSet:
    """Draw `n` images from a pixel-space pipeline with the sampling options of `sample` (the model's defaults
    where None); without classes there, every class in turn (the reference splits are balanced)."""
    where = str(pipeline.path) if pipeline.path is not None else repr(pipeline)
    at = "" if pipeline.step is None else f" (step {pipeline.step})"
    log(f"sampling {n} images from {where}{at} ...")
    out = pipeline.sample(sample, n=n, batch_size=batch_size, seed=seed, progress=progress, output_type="tensor")
    blocks = out.blocks.double().mean().item()
    plan = {key: value for key, value in out.plan.items() if key not in ("iterations", "tol")}  # per step: long
    details = {
        "kind": pipeline.kind,
        "checkpoint": where,
        "step": pipeline.step,
        "weights": pipeline.weights,
        "seed": seed,
        "blocks_per_sample": blocks,
        **plan,
        "sampling_seconds": out.seconds,
    }
    source = f"{where}{at}, {plan.get('steps')} {plan.get('sampler')} steps, {blocks:.1f} blocks/sample, seed {seed}"
    return ImageSet(to_uint8(out.images), source, details)
