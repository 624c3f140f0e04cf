"""A Fashion-MNIST feature extractor fpdm trains itself, for FID/KID where Inception-v3's weights are absent.

Inception-v3 features are what "FID" means in papers, but its weights download from the internet. Offline,
fpdm uses a small CNN classifier trained on Fashion-MNIST train (fixed seed, about 100 s on CPU) and measures on
its penultimate layer: the metric is then "FID (fpdm-fmnist-cnn features)", never Inception FID. The file is
safetensors; its metadata records the architecture, the test accuracy and the number of training steps, and
its sha256 names the exact weights in every report.

The extractor is trained once and shipped inside the package (weights/, `SHIPPED_SHA256`): a CNN trained on
each machine differs in its last bits between machines, and so would every FID measured on it. `train_extractor`
stays for a deliberate retrain (`fpdm eval --train-extractor`, into ~/.cache/fpdm), used only when asked for.

Input convention (torch-fidelity's): uint8 (N, C, H, W) in [0, 255]. RGB is averaged to gray; 32x32 is the
native size (Fashion-MNIST's 28x28 padded with the background, as fpdm's data pipeline does), and any other
size is padded (28) or resized. Inside, pixels map to [-1, 1] exactly as fpdm's images do.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpdm.errors import UsageError
from fpdm.io.checkpoint import sha256_file

NAME = "fpdm-fmnist-cnn"
DEFAULT_CACHE = "~/.cache/fpdm"
FILE_NAME = "fpdm-fmnist-cnn.safetensors"
# the shipped file's hash: a changed file is refused rather than silently giving other FIDs; see docs/evaluation.md
# for the command that made it
SHIPPED_SHA256 = "585d51eca82b0422170dc3c0e8885c3b88ef0d71fa1def9d100e0106e38cb2e7"
DEFAULT_WIDTHS = (16, 32, 64)
DEFAULT_FEATURES = 128


class FmnistCNN(nn.Module):
    """Three conv stages (3x3 conv, batch norm, ReLU, 2x2 max-pool) -> Linear to `features` (the penultimate layer, used
    for FID/KID) -> ReLU, dropout -> Linear to 10 logits."""

    feature_scale: Tensor  # a registered buffer: nn.Module's __getattr__ alone would type it Tensor | Module

    def __init__(self, *, widths: tuple[int, int, int] = DEFAULT_WIDTHS, features: int = DEFAULT_FEATURES) -> None:
        super().__init__()
        self.widths, self.features = tuple(widths), features
        layers: list[nn.Module] = []
        c_in = 1
        for c in widths:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.penultimate = nn.Linear(widths[-1] * 4 * 4, features)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(features, 10)
        # 1 / RMS of the penultimate activations on the test split, set after training: features of unit scale
        # keep KID's cubic kernel (x.y / d + 1)^3 in a range float32 resolves (raw activations reach tens)
        self.register_buffer("feature_scale", torch.ones(()))

    def embed(self, x: Tensor) -> Tensor:
        """(N, 1, 32, 32) float in [-1, 1] -> (N, features), the penultimate layer before its ReLU."""
        h = self.convs(x)  # (N, widths[-1], 4, 4)
        return self.penultimate(h.flatten(1))  # (N, features)

    def features_of(self, x: Tensor) -> Tensor:
        """The metric features: `embed` times the stored scale. (N, 1, 32, 32) -> (N, features)."""
        return self.embed(x) * self.feature_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(F.relu(self.embed(x))))  # (N, 10)


def to_model_input(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) -> float32 (N, 1, 32, 32) in [-1, 1], the same mapping as fpdm.data."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (N, 1 or 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    x = images.to(torch.float32)
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)  # (N, 1, H, W)
    x = x.div_(255).mul_(2).sub_(1)
    h, w = x.shape[-2:]
    if h == w == 28:
        return F.pad(x, (2, 2, 2, 2), value=-1.0)  # (N, 1, 32, 32)
    if (h, w) != (32, 32):
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False).clamp_(-1, 1)
    return x


@dataclasses.dataclass(frozen=True)
class ExtractorFile:
    """A trained extractor as loaded: the network (eval mode) and what its file says about it."""

    model: FmnistCNN
    path: Path
    test_accuracy: float
    test_images: int
    train_steps: int
    sha256: str

    def describe(self) -> str:
        return f"{NAME} (test acc {self.test_accuracy:.1%} on {self.test_images} images, sha256 {self.sha256[:12]})"


def shipped_path() -> Path:
    """The extractor shipped as package data (wheel and editable install alike); every machine uses this file."""
    return Path(__file__).with_name("weights") / FILE_NAME


def cache_path(cache: str | Path | None = None) -> Path:
    """Where `fpdm eval --train-extractor` writes a retrained extractor (default ~/.cache/fpdm); read only when
    asked for (`fpdm eval --cache DIR`, or the file as `--extractor`)."""
    return Path(cache or DEFAULT_CACHE).expanduser() / FILE_NAME


def load_shipped() -> ExtractorFile:
    """The shipped extractor, its sha256 checked against `SHIPPED_SHA256`."""
    path = shipped_path()
    if not path.is_file():
        raise UsageError(f"the shipped {NAME} extractor {path} is missing: reinstall fpdm")
    return load_extractor(path, sha256=SHIPPED_SHA256)


def save_extractor(model: FmnistCNN, path: Path, *, test_accuracy: float, test_images: int, train_steps: int) -> str:
    """Write weights + metadata atomically; returns the file's sha256."""
    from safetensors.torch import save_file

    meta = {
        "format": NAME,
        "widths": json.dumps(list(model.widths)),
        "features": str(model.features),
        "test_accuracy": repr(test_accuracy),
        "test_images": str(test_images),
        "train_steps": str(train_steps),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    _sort_metadata(tmp)
    tmp.replace(path)
    return sha256_file(path)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted. safetensors writes that map in an order that
    changes from process to process, so the same weights would get another sha256 on every save."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")  # the file: u64 header length, JSON header, tensor bytes
    header = json.loads(raw[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to keep the tensors 8-byte aligned
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])


def load_extractor(path: str | Path, *, sha256: str | None = None) -> ExtractorFile:
    """Load a file written by `save_extractor` (safetensors: no pickled code). A missing or foreign file, or
    one whose sha256 is not `sha256` when given, is a one-line `UsageError`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"feature extractor file {path} does not exist (train one with fpdm eval --train-extractor)")
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256:
        raise UsageError(
            f"{path} has sha256 {digest[:12]}, not the expected {sha256[:12]}: the file is changed or corrupt "
            "(reinstall fpdm)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- a safe_open handle is not iterable
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a safetensors file: {exc}") from None
    if meta.get("format") != NAME:
        raise UsageError(f"{path} is not an {NAME} feature extractor (metadata format {meta.get('format')!r})")
    model = FmnistCNN(widths=tuple(json.loads(meta["widths"])), features=int(meta["features"]))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UsageError(f"{path}: weights do not match the recorded architecture ({first})") from None
    model.eval().requires_grad_(False)
    return ExtractorFile(
        model, path, float(meta["test_accuracy"]), int(meta["test_images"]), int(meta["train_steps"]), digest
    )


@dataclasses.dataclass(frozen=True)
class TrainReport:
    path: Path
    test_accuracy: float
    seconds: float
    steps: int
    sha256: str


def train_extractor(
    path: str | Path,
    *,
    data_path: str | None = None,
    epochs: int = 3,
    steps: int | None = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    widths: tuple[int, int, int] = DEFAULT_WIDTHS,
    features: int = DEFAULT_FEATURES,
    log: Callable[[str], None] | None = None,
) -> TrainReport:
    """Train the classifier on Fashion-MNIST train with a fixed seed (Adam, cosine-decayed LR), measure its
    accuracy on the test split, and save it to `path`. `steps` (else `epochs` passes), `train_limit` and
    `test_limit` shrink the job for tests; the real extractor uses the defaults."""
    from fpdm.config import DataConfig
    from fpdm.data.images import fashion_mnist

    log = log or (lambda message: None)
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y = fashion_mnist(DataConfig(path=data_path, split="train")).tensors()  # (N, 1, 32, 32)
    test_x, test_y = fashion_mnist(DataConfig(path=data_path, split="test")).tensors()
    train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    test_x, test_y = test_x[:test_limit], test_y[:test_limit]
    model = FmnistCNN(widths=widths, features=features)
    per_epoch = max(1, len(train_x) // batch_size)
    total = steps if steps is not None else epochs * per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
    log(
        f"training {NAME} on {len(train_x)} Fashion-MNIST train images: {total} steps of batch {batch_size}, "
        f"seed {seed}"
    )
    model.train()
    order = torch.randperm(len(train_x), generator=gen)
    for step in range(total):
        if step and step % per_epoch == 0:
            order = torch.randperm(len(train_x), generator=gen)
        idx = order[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size]
        loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % per_epoch == 0 or step + 1 == total:
            log(f"  step {step + 1}/{total}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()  # before anything else sees data: batch norm in train mode would move its running statistics
    accuracy = evaluate(model, test_x, test_y)
    with torch.no_grad():
        rms = torch.cat([model.embed(test_x[i : i + 1000]) for i in range(0, len(test_x), 1000)]).pow(2).mean().sqrt()
        model.feature_scale.fill_(1.0 / float(rms.clamp_min(1e-6)))
    sha = save_extractor(
        model, Path(path).expanduser(), test_accuracy=accuracy, test_images=len(test_x), train_steps=total
    )
    seconds = time.perf_counter() - start
    log(f"test accuracy {accuracy:.2%} on {len(test_x)} Fashion-MNIST test images; {seconds:.0f} s; saved {path}")
    return TrainReport(Path(path).expanduser(), accuracy, seconds, total, sha)


@torch.no_grad()
def evaluate(model: FmnistCNN, images: Tensor, labels: Tensor, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `model` on float (N, 1, 32, 32) images in [-1, 1]."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    model.train(was_training)
    return correct / max(1, len(images))
