"""Checkpoints that cannot run code and are never half-written.

A checkpoint is a folder `step-NNNNNNNN/` holding model.safetensors, ema.safetensors, optimizer.pt and
trainer.pt (tensors and plain values only, loaded with weights_only=True; both absent from imported
weights, which sample and export but cannot resume training), config.json, model.json (how to
rebuild the denoiser without the data set) and meta.json
(format version, step and the sha256 of every file). It is written under a hidden temporary name, fsynced,
then renamed into place, so a crash leaves either the previous checkpoints or the new one, never a torn one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import UsageError

FORMAT = "fpdm-checkpoint"
FORMAT_VERSION = 1
PREFIX = "step-"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    config: dict[str, Any]
    spec: dict[str, Any]  # {"denoiser": registered name, "options": factory options, "class_names": [...]}
    model: dict[str, Tensor]
    ema: dict[str, Tensor]

    def training_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(optimizer state dict, trainer state) for resuming; plain tensors and values only."""
        if not (self.path / "optimizer.pt").is_file():
            raise UsageError(f"{self.path} holds weights without optimizer or trainer state (e.g. imported "
                             "weights): it samples and exports but cannot resume training")
        return _torch_load(self.path / "optimizer.pt"), _torch_load(self.path / "trainer.pt")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weights(module: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    state = module if isinstance(module, dict) else module.state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(root: Path, step: int, *, model: nn.Module | dict[str, Tensor], ema: nn.Module | dict[str, Tensor],
                    optimizer: torch.optim.Optimizer | None, config: dict[str, Any], spec: dict[str, Any],
                    trainer_state: dict[str, Any] | None, keep: int, fpdm_version: str) -> Path:
    """Write checkpoint `step` under `root` atomically and keep only the newest `keep` checkpoints.
    Without an optimizer (imported weights) neither optimizer.pt nor trainer.pt is written."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{step:08d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tag = {"format": FORMAT, "step": str(step)}
        save_file(_weights(model), tmp / "model.safetensors", metadata=tag)
        save_file(_weights(ema), tmp / "ema.safetensors", metadata=tag)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / "model.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
        files = sorted(p.name for p in tmp.iterdir())
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "fpdm_version": fpdm_version, "step": step,
                "sha256": {f: _sha256(tmp / f) for f in files}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))  # written last: marks complete
        for f in (*files, "meta.json"):
            _fsync(tmp / f)
        final = root / name
        if final.exists():  # the same step saved again (a resumed run's last step): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (those with meta.json), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest one in a run folder or a checkpoints folder."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    if not path.exists():
        raise UsageError(f"checkpoint not found: {path}")
    raise UsageError(f"no complete checkpoint in {path} (expected {PREFIX}*/meta.json or checkpoints/{PREFIX}*/)")


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Load and verify a checkpoint (format, version, checksums); every failure is one UsageError line."""
    ckpt = resolve_checkpoint(path)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"unreadable checkpoint metadata {ckpt / 'meta.json'}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UsageError(f"{ckpt} is not an fpdm checkpoint")
    if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise UsageError(f"{ckpt} has checkpoint format {meta.get('version')!r}; this fpdm reads up to {FORMAT_VERSION}")
    if verify:
        for name, digest in meta.get("sha256", {}).items():
            file = ckpt / name
            if not file.is_file():
                raise UsageError(f"checkpoint file missing: {file}")
            if _sha256(file) != digest:
                raise UsageError(f"checkpoint file corrupt (checksum mismatch): {file}")
    config, spec = _json(ckpt / "config.json"), _json(ckpt / "model.json")
    return Checkpoint(ckpt, int(meta["step"]), config, spec, _safetensors(ckpt / "model.safetensors"),
                      _safetensors(ckpt / "ema.safetensors"))


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"unreadable checkpoint file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"unreadable checkpoint file {path}: not a JSON object")
    return data


def _safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError, ValueError) as exc:
        raise UsageError(f"unreadable weights {path}: {exc}") from None


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # refuses pickled code
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise UsageError(f"unreadable checkpoint file {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
