"""An image folder -> SD-VAE latents in the official DiT/FPDM feature format (what `fpdm encode` writes).

OUT/NAME_features/<i>.npy holds (1, C, H/f, W/f) float32 latents already multiplied by the VAE's scaling
factor, OUT/NAME_labels/<i>.npy the (1,) int64 class, OUT/NAME_info.json the class names, the scale factor and
how the latents were made (fpdm.data.latents reads all three). It lives in io, not data, because it loads a VAE
from disk (fpdm.io.vae_weights) and the data package sits below io.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fpdm.build import resolve_device
from fpdm.data.images import image_files, load_image
from fpdm.data.latents import FEATURES, INFO, LABELS
from fpdm.errors import UsageError
from fpdm.io.vae_weights import load_vae
from fpdm.models.vae import AutoencoderKL


@dataclasses.dataclass(frozen=True)
class EncodeResult:
    features: Path  # OUT/NAME_features
    labels: Path  # OUT/NAME_labels
    count: int
    latent_shape: tuple[int, int, int]  # (C, H/f, W/f)
    class_names: list[str]  # empty when the images sat directly in the folder
    scale_factor: float


def encode_folder(
    images_dir: str | Path,
    out: str | Path,
    *,
    vae: str | Path | AutoencoderKL,
    image_size: int = 256,
    batch_size: int = 16,
    sample: bool = True,
    seed: int = 0,
    name: str | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> EncodeResult:
    """Encode every image of `images_dir` (class subfolders, or images directly) into OUT/NAME_* files.

    Images are center-cropped and resized to `image_size`; `sample` stores a draw of the encoder's Gaussian
    (the official extraction does this, seeded by `seed`), else its mean. `vae` is a diffusers AutoencoderKL
    folder or a loaded one; `name` defaults to the image folder's name. Paths, the name and the output are
    checked before the VAE is loaded; the output appears only when complete."""
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    root = Path(images_dir).expanduser()
    if not root.is_dir():
        raise UsageError(f"image folder {root} {'is not a directory' if root.exists() else 'does not exist'}")
    name = name or root.resolve().name
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"--name {name!r} must be a plain folder-name prefix (no '/', not starting with '.')")
    out = Path(out).expanduser()
    taken = [p for p in (out / f"{name}{FEATURES}", out / f"{name}{LABELS}") if p.exists()]
    if taken:
        raise UsageError(f"{taken[0]} already exists; choose another --name or OUT")
    target = resolve_device(device) if isinstance(device, str) else device
    if isinstance(vae, AutoencoderKL):
        model, source = vae.to(target), "an AutoencoderKL given in memory"
    else:
        model, source = load_vae(vae, device=target), str(Path(vae).expanduser().resolve())
    f, channels = model.config.downscale, model.config.in_channels
    if image_size < f or image_size % f:
        raise UsageError(f"--image-size {image_size} must be a positive multiple of {f}, the VAE's downscale")
    if channels not in (1, 3):
        raise UsageError(f"the VAE takes {channels}-channel images; only 1 (gray) or 3 (RGB) can be read")
    files, labels, class_names = image_files(root)
    info = {
        "class_names": class_names,
        "scale_factor": model.config.scaling_factor,
        "image_size": image_size,
        "vae": source,
        "sample": sample,
    }
    shape = _write(
        model,
        files,
        labels,
        out,
        name,
        info,
        size=image_size,
        batch_size=batch_size,
        sample=sample,
        seed=seed,
        device=target,
        progress=progress,
    )
    return EncodeResult(
        out / f"{name}{FEATURES}", out / f"{name}{LABELS}", len(files), shape, class_names, model.config.scaling_factor
    )


def _write(
    vae: AutoencoderKL,
    files: list[Path],
    labels: list[int],
    out: Path,
    name: str,
    info: dict[str, Any],
    *,
    size: int,
    batch_size: int,
    sample: bool,
    seed: int,
    device: torch.device,
    progress: bool,
) -> tuple[int, int, int]:
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
    shape: tuple[int, int, int] = (0, 0, 0)
    try:
        with tqdm(total=len(files), unit="img", disable=not progress) as bar:
            for first in range(0, len(files), batch_size):
                batch = files[first : first + batch_size]
                pixels = torch.stack([load_image(p, size, channels) for p in batch])  # (B, C, S, S) uint8
                x = pixels.to(device, torch.float32).div_(127.5).sub_(1.0)  # [-1, 1]
                with torch.no_grad():
                    z = vae.encode_latents(x, sample=sample, generator=generator).cpu()  # (B, c, S/f, S/f)
                c, h, w = z.shape[1:]
                shape = (c, h, w)
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
    return shape
