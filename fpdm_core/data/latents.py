"""Pre-encoded VAE latents in the official DiT/FPDM feature format, read into memory.

Layout (what the official `extract_features.py` writes): a folder ROOT holding `<name>_features/` with one
.npy of shape (1, C, H, W) float per image and `<name>_labels/` with one .npy integer label (shape (1,) or ())
per image, paired by file name (0.npy, 1.npy, ...). The latents are already multiplied by the VAE's scaling
factor (0.18215 for SD's VAE). `fpdm encode` also writes `<name>_info.json` (class names, scale factor);
the official tools ignore it, and the reader uses it when it is there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fpdm.config import DataConfig
from fpdm.data.images import ImageDataset
from fpdm.errors import UsageError

FEATURES, LABELS, INFO = "_features", "_labels", "_info.json"


class LatentDataset(ImageDataset):
    """Float latents (N, C, H, W) held as they are (no [-1, 1] scaling, no flips), with the same surface as
    `ImageDataset`: `tensors()`, `num_classes`, `class_names`, `channels`, `image_size` (the latent side)."""

    def __init__(self, latents: Tensor, labels: Tensor, *, class_names: list[str], scale_factor: float) -> None:
        # Deliberately not ImageDataset.__init__: that one converts uint8 pixels; these are ready as stored.
        if latents.dtype != torch.float32 or latents.ndim != 4 or latents.shape[2] != latents.shape[3]:
            raise ValueError(f"latents must be float32 (N, C, H, H), got {latents.dtype} {tuple(latents.shape)}")
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.channels, self.image_size = latents.shape[1], latents.shape[2]
        self.scale_factor = scale_factor
        self.random_flip = False
        self._images, self._repeat = latents, False
        self._labels = labels.to(torch.int64) if self.num_classes else torch.zeros(len(latents), dtype=torch.int64)
        self._label_list = self._labels.tolist()


def find_feature_dirs(path: str | Path) -> tuple[Path, Path, str]:
    """(features dir, labels dir, name) for `path`: a ROOT holding exactly one `<name>_features` +
    `<name>_labels` pair, or a `<name>_features` folder itself."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UsageError(
            f"data.path {root} {'is not a directory' if root.exists() else 'does not exist'}; "
            "expected a folder holding <name>_features/ and <name>_labels/"
        )
    if root.name.endswith(FEATURES):
        name = root.name[: -len(FEATURES)]
        features, labels = root, root.parent / f"{name}{LABELS}"
    else:
        names = sorted(d.name[: -len(FEATURES)] for d in root.iterdir() if d.is_dir() and d.name.endswith(FEATURES))
        if not names:
            raise UsageError(
                f"{root} holds no <name>_features folder; expected <name>_features/ and <name>_labels/ "
                "of .npy files (the official DiT/FPDM feature format)"
            )
        if len(names) > 1:
            raise UsageError(
                f"{root} holds several feature sets ({', '.join(names)}); point data.path at one <name>_features folder"
            )
        name = names[0]
        features, labels = root / f"{name}{FEATURES}", root / f"{name}{LABELS}"
    if not labels.is_dir():
        raise UsageError(f"{features} has no matching labels folder {labels}")
    return features, labels, name


def _npy_files(folder: Path) -> dict[str, Path]:
    files = {p.stem: p for p in folder.iterdir() if p.suffix == ".npy" and p.is_file()}
    if not files:
        raise UsageError(f"{folder} holds no .npy files")
    return files


def _order(stems: set[str]) -> list[str]:
    """Numeric names in numeric order (2 before 10), otherwise in string order."""
    if all(s.isdigit() for s in stems):
        return sorted(stems, key=int)
    return sorted(stems)


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UsageError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else 'not a .npy file'}") from None


def _read_info(features: Path, name: str) -> dict[str, Any]:
    path = features.parent / f"{name}{INFO}"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    names = info.get("class_names", []) if isinstance(info, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"{path} must be a JSON object whose class_names is a list of strings")
    return info


def latent_folder(config: DataConfig) -> LatentDataset:
    """Every latent of the feature set at `config.path`, checked against data.channels and data.image_size."""
    if config.path is None:
        raise UsageError("data.path is required for data.name='latents': the folder holding <name>_features/")
    if config.random_flip:
        raise UsageError("data.random_flip does not apply to latents; flip the images before encoding them")
    features_dir, labels_dir, name = find_feature_dirs(config.path)
    features, labels = _npy_files(features_dir), _npy_files(labels_dir)
    unpaired = sorted(set(features) ^ set(labels))
    if unpaired:
        stem = unpaired[0]
        have, lack = (features_dir, labels_dir) if stem in features else (labels_dir, features_dir)
        raise UsageError(
            f"{have / (stem + '.npy')} has no partner in {lack} ({len(unpaired)} unpaired files); "
            "features and labels are matched by file name"
        )
    stems = _order(set(features))
    shape = (config.channels, config.image_size, config.image_size)
    latents = torch.empty((len(stems), *shape), dtype=torch.float32)  # (N, C, H, W)
    values = np.empty(len(stems), dtype=np.int64)
    for i, stem in enumerate(stems):
        latents[i] = torch.from_numpy(_check_feature(_load(features[stem]), features[stem], shape))
        values[i] = _check_label(_load(labels[stem]), labels[stem])
    info = _read_info(features_dir, name)
    scale = info.get("scale_factor")
    if scale is not None and not math.isclose(float(scale), config.scale_factor, rel_tol=1e-6):
        raise UsageError(
            f"the latents in {features_dir} were scaled by {scale} (see {name}{INFO}); set data.scale_factor={scale}"
        )
    count = int(values.max()) + 1
    class_names = info.get("class_names") or [str(i) for i in range(count)]
    if count > len(class_names):
        raise UsageError(
            f"label {count - 1} in {labels_dir} is out of range for the {len(class_names)} class names of {name}{INFO}"
        )
    return LatentDataset(
        latents,
        torch.from_numpy(values),
        scale_factor=config.scale_factor,
        class_names=class_names if config.class_conditional else [],
    )


def _check_feature(array: np.ndarray, path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating):
        raise UsageError(f"{path} holds {array.dtype}; latents must be float16/32/64")
    if array.shape not in ((1, *shape), shape):
        c, h, _ = shape
        raise UsageError(
            f"{path} has shape {array.shape}, expected (1, {c}, {h}, {h}) as data.channels={c} and "
            f"data.image_size={h} ask (set them to the latents' channels and side)"
        )
    if not np.isfinite(array).all():
        raise UsageError(f"{path} holds NaN or infinite values")
    return array.reshape(shape).astype(np.float32)


def _check_label(array: np.ndarray, path: Path) -> int:
    if not np.issubdtype(array.dtype, np.integer):
        raise UsageError(f"{path} holds {array.dtype}; a label must be an integer")
    if array.size != 1:
        raise UsageError(f"{path} has shape {array.shape}; a label must be one integer, shape (1,) or ()")
    value = int(array.reshape(()))
    if value < 0:
        raise UsageError(f"{path} holds label {value}; labels must be >= 0")
    return value
