"""Datasets: Fashion-MNIST from IDX files, or a folder of images, preprocessed once and held in memory.

Every dataset yields `(image, label)`: image float32 in [-1, 1] of shape (channels, image_size, image_size),
label a python int (0 when unconditional). Both sources are small enough to keep whole in RAM on a CPU box;
latent datasets and large, streamed image sets come later. Bad input is a one-line `UsageError`.
"""

from __future__ import annotations

import contextlib
import gzip
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from fpdm.config import DataConfig
from fpdm.errors import UsageError

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts it
FASHION_MNIST_CACHE = "~/.cache/fpdm/fashion-mnist"  # torchvision download target when the folder is missing
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # torchvision's set


# --------------------------------------------------------------------------------------------------------------
# IDX files (the MNIST family's format: http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")


def read_idx(path: str | Path) -> Tensor:
    """Read an unsigned-byte IDX file (gzipped when the name ends in .gz) into a uint8 tensor of its declared
    shape. Header: two zero bytes, type code 0x08, the number of dims, then each dim as big-endian int32; the
    payload must be exactly prod(dims) bytes. Any problem is a `UsageError` naming the file."""
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"IDX file not found: {path}") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:  # before OSError: BadGzipFile is one
        raise UsageError(f"IDX file {path} is not valid gzip ({exc})") from None
    except OSError as exc:
        raise UsageError(f"cannot read IDX file {path}: {exc.strerror or exc}") from None

    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UsageError(f"IDX file {path} has a bad magic number (expected two zero bytes, a type, a rank)")
    if data[2] != 0x08:
        raise UsageError(f"IDX file {path} has type code 0x{data[2]:02X}; only 0x08 (unsigned byte) is supported")
    ndim, header = data[3], 4 + 4 * data[3]
    if ndim == 0 or len(data) < header:
        raise UsageError(f"IDX file {path} is truncated or has rank {ndim}: its header needs {header} bytes")
    dims = [int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4)]
    if any(d < 0 for d in dims):
        raise UsageError(f"IDX file {path} declares a negative dimension: {dims}")
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise UsageError(f"IDX file {path} has {len(data) - header} payload bytes; dims {dims} need {expected}")
    # copy: frombuffer over `bytes` is read-only, and torch wants writable memory
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy())


# --------------------------------------------------------------------------------------------------------------
# The in-memory dataset


def _to_unit(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] as (p / 255) * 2 - 1, so 0 (the background) maps to exactly -1."""
    return images.to(torch.float32).div_(255).mul_(2).sub_(1)


def to_uint8(images: Tensor) -> Tensor:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, C, H, W) as round((x + 1) * 127.5): every image fpdm writes, the
    inverse of the [-1, 1] scaling above up to rounding."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(images: Tensor) -> list[Any]:
    """float (N, C, H, W) in [-1, 1] -> PIL images: gray for 1 channel, RGB for 3, RGBA for 4."""
    from PIL import Image  # lazy: only writers of image files need PIL

    arrays = to_uint8(images).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def _fit(images: Tensor, size: int) -> Tensor:
    """(N, C, H, W) uint8 -> (N, C, size, size) float32 in [-1, 1]. A square image smaller than `size` by an
    even margin is padded with -1, the background (keeps every pixel exact, as 28 -> 32 for Fashion-MNIST);
    anything else is resized with antialiased bilinear interpolation."""
    n, c, h, w = images.shape
    margin = size - h
    if h == w and margin >= 0 and margin % 2 == 0:
        p = margin // 2
        return F.pad(_to_unit(images), (p, p, p, p), value=-1.0)
    out = torch.empty((n, c, size, size), dtype=torch.float32)
    for start in range(0, n, 4096):  # chunks: bounds the float temporaries of interpolating 60k images at once
        chunk = _to_unit(images[start : start + 4096])
        chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + 4096] = chunk.clamp_(-1.0, 1.0)
    return out


class ImageDataset(Dataset[tuple[Tensor, int]]):
    """Images held in memory, preprocessed once to float32 (N, C, image_size, image_size) in [-1, 1].

    Everything costly (scaling, padding or resizing) happens here in the constructor, so `__getitem__` is an
    index and a copy (~3 us): the training loop pulls many thousands of batches on a small CPU. Gray images
    asked for with `channels=3` are stored with one channel and repeated per item, a third of the memory
    (Fashion-MNIST at 32x32: 245 MB rather than 740 MB).

    `class_names` empty means unconditional: `num_classes` is 0 and every label is 0. `random_flip` flips
    horizontally with p=0.5 using torch's global RNG, so a seeded DataLoader (which seeds each worker) makes
    it reproducible. Items are fresh tensors, never views of the stored images.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        *,
        image_size: int,
        channels: int,
        class_names: Sequence[str] = (),
        random_flip: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if channels not in (1, 3) or (images.shape[1] == 3 and channels == 1):
            raise ValueError(f"cannot make {channels} channel(s) from {images.shape[1]}; convert before")
        self.class_names: list[str] = list(class_names)
        self.num_classes = len(self.class_names)
        self.channels = channels
        self.image_size = image_size
        self.random_flip = random_flip
        self._images = _fit(images, image_size)  # (N, C_src, S, S) float32
        self._repeat = channels == 3 and images.shape[1] == 1
        n = images.shape[0]
        if self.num_classes:
            if labels is None or labels.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {None if labels is None else labels.shape}")
            if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
            self._labels = labels.to(torch.int64)
        else:
            self._labels = torch.zeros(n, dtype=torch.int64)
        self._label_list: list[int] = self._labels.tolist()  # python ints: cheaper than int(tensor) per item

    def __len__(self) -> int:
        return self._images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self._images[index]  # (C_src, S, S), a view into the store
        if self._repeat:
            image = image.expand(3, -1, -1)  # (3, S, S), still a view
        if self.random_flip and torch.rand(()).item() < 0.5:
            image = image.flip(-1)  # flip copies
        else:
            image = image.contiguous() if self._repeat else image.clone()  # never hand out the store itself
        return image, self._label_list[index]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All images as float32 (N, channels, S, S) in [-1, 1], unflipped, and int64 labels (N,): fresh
        copies on each call, for evaluation and fast batched access (index them with a batch of indices)."""
        images = self._images.repeat(1, 3, 1, 1) if self._repeat else self._images.clone()  # (N, C, S, S)
        return images, self._labels.clone()


# --------------------------------------------------------------------------------------------------------------
# Sources


def fashion_mnist(config: DataConfig) -> ImageDataset:
    """Fashion-MNIST's `config.split` from the IDX folder `config.path` (default: the Debian package's). Only
    when the default folder is missing is a torchvision download into ~/.cache/fpdm tried; an explicit
    `data.path` that lacks the files is an error rather than silently replaced by another copy."""
    stem = "train" if config.split == "train" else "t10k"
    folder = Path(config.path or DEFAULT_FASHION_MNIST_DIR).expanduser()
    found = [_find_idx(folder, f"{stem}-{kind}-idx{rank}-ubyte") for kind, rank in (("images", 3), ("labels", 1))]
    if found[0] is not None and found[1] is not None:
        images, labels = read_idx(found[0]), read_idx(found[1])
        where = f"{found[0]} and {found[1]}"
    elif config.path is not None:
        missing = f"{stem}-{'images-idx3' if found[0] is None else 'labels-idx1'}-ubyte[.gz]"
        raise UsageError(f"data.path {folder} has no {missing}; point data.path at the Fashion-MNIST IDX folder")
    else:
        try:
            images, labels = _download_fashion_mnist(train=config.split == "train")
        except Exception:  # any download failure (offline, mirror down) leads to the same advice
            raise UsageError(
                f"Fashion-MNIST folder {folder} is missing and downloading it failed; install the Debian package "
                "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass data.path=FOLDER"
            ) from None
        where = f"the torchvision download in {FASHION_MNIST_CACHE}"
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise UsageError(
            f"Fashion-MNIST images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match "
            f"(expected (N, H, W) and (N,)) in {where}"
        )
    if labels.numel() and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise UsageError(f"Fashion-MNIST labels go up to {int(labels.max())}, expected 0..9, in {where}")
    return ImageDataset(
        images.unsqueeze(1),  # (N, 1, 28, 28)
        labels.to(torch.int64),
        image_size=config.image_size,
        channels=config.channels,
        class_names=FASHION_MNIST_CLASSES if config.class_conditional else (),
        random_flip=config.random_flip,
    )


def _find_idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _download_fashion_mnist(*, train: bool) -> tuple[Tensor, Tensor]:
    """(N, 28, 28) uint8 images and (N,) labels via torchvision; raises whatever the download raises."""
    from torchvision.datasets import FashionMNIST  # lazy: torchvision is slow to import and rarely needed here

    ds = FashionMNIST(root=str(Path(FASHION_MNIST_CACHE).expanduser()), train=train, download=True)
    return ds.data, ds.targets


def image_folder(config: DataConfig) -> ImageDataset:
    """Every image under `config.path` converted by `load_image` (gray or RGB, center-cropped, resized to
    image_size), kept in memory: meant for small datasets on CPU. Class subfolders (torchvision ImageFolder
    layout; subfolders without images are skipped) give labels from their sorted names; images directly in the
    folder give an unconditional dataset, as does `class_conditional = false`. One unreadable file refuses the
    folder, naming it (training should not silently learn from less than it was given)."""
    if config.path is None:
        raise UsageError("data.path is required for data.name='image_folder': the folder of images")
    root = Path(config.path).expanduser()
    if not root.exists():
        raise UsageError(f"data.path {root} does not exist")
    if not root.is_dir():
        raise UsageError(f"data.path {root} is not a directory")
    files, label_list, names = image_files(root)
    labels = torch.tensor(label_list)
    images = torch.empty((len(files), config.channels, config.image_size, config.image_size), dtype=torch.uint8)
    for i, file in enumerate(files):
        images[i] = load_image(file, config.image_size, config.channels)
    return ImageDataset(
        images,
        labels,
        image_size=config.image_size,
        channels=config.channels,
        class_names=names if config.class_conditional else (),
        random_flip=config.random_flip,
    )


def image_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """The image files of an image folder, their labels and the sorted class names (empty when the images sit
    directly in `root`): the layout rules of `image_folder`, for readers that stream the files."""
    flat = _images_in(root, recursive=False)
    classes = {d.name: _images_in(d, recursive=True) for d in sorted(root.iterdir()) if _visible_dir(d)}
    classes = {name: files for name, files in classes.items() if files}
    if flat and classes:
        raise UsageError(
            f"{root} has images directly and in class subfolders ({', '.join(classes)}); use one layout or the other"
        )
    if not flat and not classes:
        raise UsageError(f"no images found in {root}; expected class subfolders of images or images directly")
    names = sorted(classes)
    files = flat + [f for name in names for f in classes[name]]
    return files, [0] * len(flat) + [i for i, name in enumerate(names) for _ in classes[name]], names


def _visible_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".")  # .ipynb_checkpoints and the like are not classes


def _images_in(folder: Path, *, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class UnreadableImage(UsageError):
    """An image file PIL cannot read (corrupt, truncated, not an image at all): training refuses the folder,
    evaluation skips the file and says so."""


@contextlib.contextmanager
def open_image(path: Path) -> Iterator[Any]:
    """`PIL.Image.open(path)` whose failures, while opening or while decoding inside the block, are one-line
    `UnreadableImage` errors naming the file."""
    from PIL import Image, UnidentifiedImageError  # lazy: only image folders need PIL

    try:
        with Image.open(path) as image:
            yield image
    except UnidentifiedImageError:  # its own message repeats the path; say what it means instead
        raise UnreadableImage(f"cannot read image {path}: not an image format PIL recognises (corrupt?)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # truncated data, bad modes, huge files
        raise UnreadableImage(f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def is_gray(image: Any) -> bool:
    """Whether a PIL image holds gray pixels only: one band besides alpha (L, LA, I;16, I, F, 1), or color bands
    equal everywhere (gray stored as RGB, a gray palette). Decodes the pixels only in the second case."""
    bands = [band for band in image.getbands() if band != "A"]
    if len(bands) == 1 and bands[0] != "P":
        return True
    rgb = np.asarray(_eight_bit(image).convert("RGB"))  # (H, W, 3)
    return bool((rgb[..., :1] == rgb[..., 1:]).all())


def load_image(path: Path, size: int, channels: int) -> Tensor:
    """One image file -> (channels, size, size) uint8: the one conversion of every image file fpdm reads
    (training's image folders, `fpdm encode`, both sides of `fpdm eval`). Gray or RGB as `channels` asks (PIL's
    ITU-R 601-2 luma for gray, gray repeated for RGB, alpha dropped, palettes expanded, 16-bit gray scaled to
    8 bits), center-cropped to a square, resized to `size` (bicubic; PIL widens the kernel when shrinking).
    An unreadable file is an `UnreadableImage`."""
    from PIL import Image

    with open_image(path) as image:
        im = _eight_bit(image).convert("L" if channels == 1 else "RGB")  # loads the pixels: corrupt data fails here
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(im, dtype=np.uint8).reshape(size, size, channels)  # (S, S, C)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, S, S)


def _eight_bit(image: Any) -> Any:
    """`image` in a mode PIL converts to L or RGB faithfully. PIL clips 16-bit gray (I;16, and I as 16-bit PNGs
    used to open) at 255 instead of scaling it, and warns on palettes with transparency: scale 65535 -> 255 as
    torchvision does, and expand such palettes to RGBA first."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.asarray(image, dtype=np.float64)  # (H, W) in 0..65535
        return Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA")
    return image
