"""What an evaluation compares: image folders, Fashion-MNIST splits, image tensors and samples drawn from a model.

Every source becomes uint8 (N, C, H, W), the form torch-fidelity hands its feature extractors, plus a short
description for the report. Image files go through training's own conversion (`fpdm.data.images.load_image`:
gray or RGB, center crop, bicubic resize) to the size and channels the comparison needs, and folders follow
training's layout rules (flat, or class subfolders). Unreadable files are skipped and reported; bad input is a
one-line `UsageError`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import Tensor

from fpdm.config import DataConfig, make_config
from fpdm.data.images import UnreadableImage, fashion_mnist, image_files, is_gray, load_image, open_image, to_uint8
from fpdm.errors import UsageError
from fpdm.io.packed import is_packed
from fpdm.io.vae_weights import load_vae, resolve_vae_folder

if TYPE_CHECKING:
    from fpdm.config import SampleConfig
    from fpdm.models.vae import AutoencoderKL
    from fpdm.pipeline import Pipeline

FASHION_MNIST_NAMES = ("fashion_mnist", "fashion-mnist", "fmnist")
N_HINT = "FID needs about 1000 samples or more"
SHOWN_SKIPPED = 3  # unreadable files named in the one-line note; the JSON report lists up to 20
Log = Callable[[str], None]


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


def check_sources(samples: Any, *, ref: str, n: int | None, vae: Any) -> None:
    """What needs no loading: the kind of `samples` and its path, `n` for a model, the reference's path, and
    the VAE's folder (only a model's samples are decoded)."""
    if isinstance(samples, (str, Path)):
        path = Path(samples).expanduser()
        if not path.exists():
            raise UsageError(f"{path} does not exist")
        model = is_model_path(path)
    elif isinstance(samples, Tensor):
        model = False
    elif callable(getattr(samples, "sample", None)):
        model = True
    else:
        raise UsageError(f"samples must be a folder, an image tensor or a Pipeline, got {type(samples).__name__}")
    if model and n is None:
        raise UsageError(f"evaluating a model draws samples: give n (--n), e.g. 1000 ({N_HINT})")
    if not model and vae is not None:
        raise UsageError("vae (--vae) decodes a latent model's samples; the samples given are images already")
    if isinstance(vae, (str, Path)):
        resolve_vae_folder(vae)
    if not is_fashion_mnist(ref) and not Path(ref).expanduser().exists():
        raise UsageError(f"--ref {ref}: not a folder and not a known dataset (known: fashion_mnist)")


def image_root(folder: Path) -> Path:
    """The images/ of an `fpdm sample` output folder (not its grid.png), else `folder` itself."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder of images")
    if (folder / "stats.json").is_file() and (folder / "images").is_dir():
        return folder / "images"
    return folder


def load_folder(
    folder: str | Path,
    *,
    size: int | None = None,
    channels: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    log: Log | None = None,
) -> ImageSet:
    """The images of a folder (flat, or in class subfolders) as uint8 (N, C, size, size), each converted as
    training converts it. `size` None: the most common short side among the images (the smallest of equally
    common ones); `channels` None: 1 when every image is gray (gray stored as RGB included), else 3. `limit`
    keeps a seeded random subset. Unreadable files are skipped, with one line to `log`; none readable is an error."""
    root = image_root(Path(folder).expanduser())
    files, _, classes = image_files(root)
    order = files
    if limit is not None and limit < len(files):
        pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
        order = [files[i] for i in pick]
    bad: dict[Path, str] = {}
    if size is None or channels is None:
        found_size, found_channels = _survey(order, limit, bad)
        size, channels = size or found_size, channels or found_channels
    if size is None or channels is None:  # nothing surveyed could be opened
        _refuse_unreadable(root, bad)
    position = {path: k for k, path in enumerate(files)}
    loaded: list[tuple[int, Tensor]] = []
    for path in order:
        if limit is not None and len(loaded) == limit:
            break
        if path in bad:
            continue
        try:
            loaded.append((position[path], load_image(path, size, channels)))  # (C, S, S) uint8
        except UnreadableImage as exc:
            bad[path] = str(exc)
    if not loaded:
        _refuse_unreadable(root, bad)
    skipped = [path.relative_to(root).as_posix() for path in files if path in bad]
    if skipped and log is not None:
        names = ", ".join(skipped[:SHOWN_SKIPPED]) + (", ..." if len(skipped) > SHOWN_SKIPPED else "")
        log(f"skipped {_count(len(skipped), 'unreadable image file')} in {root}: {names}")
    images = torch.stack([image for _, image in sorted(loaded, key=lambda item: item[0])])  # (N, C, S, S), file order
    notes = [_count(len(classes), "class")] if classes else []
    notes += [f"{_count(len(skipped), 'unreadable file')} skipped"] if skipped else []
    if limit is not None and limit < len(files):
        notes.append(f"a seeded random {len(loaded)} of {len(files)} files")
    details = {"kind": "folder", "path": str(root), "classes": classes, "skipped": len(skipped)}
    if skipped:
        details["skipped_files"] = skipped[:20]
    return ImageSet(images, f"{root} ({', '.join(notes)})" if notes else str(root), details)


def _survey(order: list[Path], limit: int | None, bad: dict[Path, str]) -> tuple[int | None, int | None]:
    """(most common short side, 1 if all gray else 3) over the files `load_folder` will read, from their headers
    (pixels only while every image so far is gray); unreadable ones go into `bad`."""
    sides: collections.Counter[int] = collections.Counter()
    gray = True
    for path in order:
        if limit is not None and sum(sides.values()) == limit:
            break
        try:
            with open_image(path) as image:
                sides[min(image.size)] += 1
                gray = gray and is_gray(image)
        except UnreadableImage as exc:
            bad[path] = str(exc)
    if not sides:
        return None, None
    top = max(sides.values())
    return min(side for side, count in sides.items() if count == top), 1 if gray else 3


def _refuse_unreadable(root: Path, bad: dict[Path, str]) -> NoReturn:
    first = next(iter(bad.values()), "")
    raise UsageError(f"no readable images in {root}: all {_count(len(bad), 'image file')} failed; first: {first}")


def _count(n: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith("s") else "s")
    return f"{n} {noun if n == 1 else plural}"


def from_tensor(images: Tensor) -> ImageSet:
    """Float images (N, C, H, W) in [-1, 1] (what `Pipeline.sample` returns), or uint8 ones, as an ImageSet.
    Floats map to uint8 exactly as `fpdm sample` writes its PNGs, so a tensor and its PNG folder score alike."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UsageError(f"sample images must be (N, C, H, W) with 1 or 3 channels, got shape {tuple(images.shape)}")
    if images.shape[2] != images.shape[3]:
        raise UsageError(
            f"sample images must be square, got {images.shape[3]}x{images.shape[2]}: the reference is converted "
            "as training converts images, center-cropped to a square"
        )
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise UsageError(f"sample images must be float in [-1, 1] or uint8, got {images.dtype}")
        if not bool(torch.isfinite(images).all()):
            raise UsageError("sample images hold NaN or inf")
        images = to_uint8(images.detach().float().cpu())
    return ImageSet(images.cpu().contiguous(), f"a tensor of {images.shape[0]} images", {"kind": "tensor"})


def load_reference(
    name: str,
    *,
    split: str,
    data_dir: str | None,
    limit: int | None,
    seed: int,
    size: int | None = None,
    channels: int | None = None,
    log: Log | None = None,
) -> ImageSet:
    """`fashion_mnist` (the `split`, converted as fpdm's training data: 28x28 padded to 32x32 by default) or a
    folder of images (`load_folder`), at `size` and `channels` (None: the data's own); `limit` keeps a seeded
    random subset."""
    if not is_fashion_mnist(name):
        if not Path(name).expanduser().exists():
            raise UsageError(f"--ref {name}: not a folder and not a known dataset (known: fashion_mnist)")
        return load_folder(name, size=size, channels=channels, limit=limit, seed=seed, log=log)
    config = make_config(
        DataConfig, path=data_dir, split=split, class_conditional=False, image_size=size or 32, channels=channels or 1
    )
    images, _ = fashion_mnist(config).tensors()  # (N, C, S, S) float in [-1, 1]
    side = config.image_size
    how = "padded" if side >= 28 and (side - 28) % 2 == 0 else "resized"  # the rule of training's ImageDataset
    kind = "" if config.channels == 1 else ", as RGB"
    ref = ImageSet(
        to_uint8(images),
        f"Fashion-MNIST {split} split (28x28 {how} to {side}x{side}{kind})",
        {"kind": "fashion_mnist", "split": split},
    )
    if limit is not None and limit < ref.images.shape[0]:
        keep = torch.randperm(ref.images.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
        ref = dataclasses.replace(
            ref,
            images=ref.images[keep.sort().values],
            source=f"{ref.source}, a seeded random {limit} of {ref.images.shape[0]}",
        )
    return ref


@dataclasses.dataclass(frozen=True)
class ModelSamples:
    """A model to sample from: the pipeline, the VAE that decodes a latent model's samples, and the shape of the
    images it will produce."""

    pipeline: Pipeline
    vae: AutoencoderKL | None
    vae_source: str | None  # for the report
    shape: tuple[int, int, int]  # (C, H, W) of the (decoded) samples


def load_model(pipeline: Pipeline, *, vae: str | Path | AutoencoderKL | None = None) -> ModelSamples:
    """`pipeline` with what its samples will be: pixels as they are, or a latent model's latents decoded by
    `vae` (a diffusers AutoencoderKL folder or a loaded one; default: the VAE the run recorded), which
    `Pipeline.sample` applies as `fpdm sample --vae` does. Mismatches are one-line errors, before any sampling."""
    denoiser: Any = pipeline.denoiser  # FPDM and DiT carry in_channels / input_size; the interface leaves them out
    channels, size = denoiser.in_channels, denoiser.input_size
    decoder: AutoencoderKL | None = None
    source = None
    if not pipeline.is_latent:
        if vae is not None:
            raise UsageError(
                f"vae (--vae) applies to latent models only; this model generates ({channels}, {size}, {size}) "
                "images directly"
            )
    else:
        vae = vae if vae is not None else pipeline.spec["latent"].get("vae")  # a VAE folder the run recorded
        if vae is None:
            raise UsageError(
                f"this model generates latents of shape ({channels}, {size}, {size}); pass --vae DIR (vae=) holding "
                "the diffusers AutoencoderKL that decodes them (config.json + diffusion_pytorch_model.safetensors)"
            )
        if isinstance(vae, (str, Path)):
            decoder, source = load_vae(vae, device=pipeline.device), str(Path(vae).expanduser())
        else:
            decoder, source = vae, "an AutoencoderKL given in memory"
        if decoder.config.latent_channels != channels:
            raise UsageError(
                f"the VAE {source} has {decoder.config.latent_channels} latent channels; "
                f"this model generates {channels}"
            )
        channels, size = decoder.config.out_channels, size * decoder.config.downscale
    if channels not in (1, 3):
        raise UsageError(f"this model makes {channels}-channel images; fpdm eval compares gray or RGB images")
    return ModelSamples(pipeline, decoder, source, (channels, size, size))


def sample_images(
    pipeline: Pipeline,
    *,
    n: int,
    batch_size: int,
    seed: int,
    sample: SampleConfig | None,
    vae: AutoencoderKL | None = None,
    vae_source: str | None = None,
    progress: bool,
    log: Log,
) -> ImageSet:
    """Draw `n` images from a pipeline with the sampling options of `sample` (the model's defaults where None);
    without classes there, every class in turn (the reference splits are balanced). A latent model's samples
    are decoded by `vae`, as `fpdm sample --vae` decodes them."""
    where = str(pipeline.path) if pipeline.path is not None else repr(pipeline)
    at = "" if pipeline.step is None else f" (step {pipeline.step})"
    log(f"sampling {n} images from {where}{at} ...")
    out = pipeline.sample(
        sample, n=n, batch_size=batch_size, seed=seed, progress=progress, output_type="tensor", vae=vae
    )
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
    decoded = ""
    if vae is not None:
        details["vae"] = vae_source
        decoded = f", decoded by the VAE {vae_source}"
    steps = f"{plan.get('steps')} {plan.get('sampler')} steps"
    source = f"{where}{at}, {steps}, {blocks:.1f} blocks/sample, seed {seed}{decoded}"
    return ImageSet(to_uint8(out.images), source, details)
