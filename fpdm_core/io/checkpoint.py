"""Checkpoints that cannot run code and are never half-written.

A checkpoint is a folder `step-NNNNNNNN/` holding model.safetensors, ema.safetensors, optimizer.pt and
trainer.pt (tensors and plain values only, loaded with weights_only=True; both absent from imported
weights, which sample and export but cannot resume training), config.json, model.json (how to
rebuild the denoiser without the data set) and meta.json
(format version, step and the sha256 of every file). It is written under a hidden temporary name, fsynced,
then renamed into place, so a crash leaves either the previous checkpoints or the new one, never a torn one;
what a killed writer leaves behind (hidden `.step-*.tmp-PID`, `.step-*.old-PID`) is swept by the next save.
`RunLock` keeps two live runs out of one folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fpdm.errors import FpdmRuntimeError, UsageError

FORMAT = "fpdm-checkpoint"
FORMAT_VERSION = 1
PREFIX = "step-"
LOCK_NAME = ".fpdm-run.lock"
_LEFTOVER = re.compile(r"^\.step-\d+\.(?:tmp|old)-(\d+)$")  # what a save writes before its rename, and after
# Only `train --resume` reads these: a checkpoint without them (imported weights, or a copy someone trimmed to
# share) still samples and exports, so verification skips them when absent and checks them when present.
RESUME_ONLY = ("optimizer.pt", "trainer.pt")


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
        if not all((self.path / name).is_file() for name in RESUME_ONLY):
            raise UsageError(
                f"{self.path} holds weights without optimizer or trainer state (e.g. imported "
                "weights, or a copy without optimizer.pt / trainer.pt): it samples and exports but "
                "cannot resume training"
            )
        return _torch_load(self.path / "optimizer.pt"), _torch_load(self.path / "trainer.pt")


def fsync(path: Path) -> None:
    """Flush `path` (a file or a folder) to disk, for writers of atomic folders."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints, packed folders, extractor weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weights(module: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    state = module if isinstance(module, dict) else module.state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: nn.Module | dict[str, Tensor],
    ema: nn.Module | dict[str, Tensor],
    optimizer: torch.optim.Optimizer | None,
    config: dict[str, Any],
    spec: dict[str, Any],
    trainer_state: dict[str, Any] | None,
    keep: int,
    fpdm_version: str,
) -> Path:
    """Write checkpoint `step` under `root` atomically and keep only the newest `keep` checkpoints.
    Without an optimizer (imported weights) neither optimizer.pt nor trainer.pt is written. A failed write
    (disk full, quota, I/O error) is an FpdmRuntimeError naming the step; the checkpoints already there stay."""
    root.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(root)
    name = f"{PREFIX}{step:08d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        tag = {"format": FORMAT, "step": str(step)}
        save_file(_weights(model), tmp / "model.safetensors", metadata=tag)
        save_file(_weights(ema), tmp / "ema.safetensors", metadata=tag)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / "model.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
        files = sorted(p.name for p in tmp.iterdir())
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "fpdm_version": fpdm_version,
            "step": step,
            "sha256": {f: sha256_file(tmp / f) for f in files},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))  # written last: marks complete
        for f in (*files, "meta.json"):
            fsync(tmp / f)
        final = root / name
        if final.exists():  # the same step saved again: move the old one aside first, so a crash keeps one whole
            _discard(final)
        os.rename(tmp, final)
        fsync(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):  # disk full, quota, I/O: a run-time failure, said in one line
            kept = list_checkpoints(root)
            previous = f"the newest complete checkpoint is {kept[-1]}" if kept else "no earlier checkpoint exists"
            raise FpdmRuntimeError(
                f"could not write checkpoint step {step} to {root}: {_oneline(exc)}; {previous}"
            ) from exc
        raise
    for old in list_checkpoints(root)[:-keep]:
        _discard(old)
    return final


def _oneline(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _discard(path: Path) -> None:
    """Remove a checkpoint so that no reader ever sees it half-deleted: rename it out of sight, then delete."""
    aside = path.parent / f".{path.name}.old-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(path, aside)
    except OSError:  # cannot rename (permissions, odd file system): delete in place as before
        aside = path
    shutil.rmtree(aside, ignore_errors=True)


def _sweep_leftovers(root: Path) -> None:
    """Delete the hidden folders a killed save left behind (their writer's pid is gone)."""
    for entry in root.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a process we may not signal still exists)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class RunLock:
    """Exclusive hold on a run folder: `RUN/.fpdm-run.lock` holds the owner's pid and, where the OS has
    fcntl, an flock that dies with the owner. A second run is refused with the holder's pid; a lock left by
    a dead process is taken over. Use as a context manager; release is idempotent."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a racing taker-over may remove the file between our open and our check
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if self._locked(fd):
                if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    os.fsync(fd)
                    self._fd = fd
                    return
            else:
                holder = _read_pid(fd)
                os.close(fd)
                raise UsageError(
                    f"{self.path.parent} is in use by a live fpdm run (pid {holder or '?'}, lock "
                    f"{self.path}); wait for it to finish or choose another --out"
                )
            os.close(fd)
        raise FpdmRuntimeError(f"could not take the run lock {self.path}: it keeps changing hands")

    def _locked(self, fd: int) -> bool:
        """Take the lock on `fd`: flock where there is one, else trust a recorded pid only while it lives."""
        if sys.platform != "win32":
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True
        holder = _read_pid(fd)  # pragma: no cover - no flock: a recorded live pid other than ours holds it
        return holder is None or holder == os.getpid() or not pid_alive(holder)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):  # unlink while still holding: a waiting taker re-checks the inode
            os.unlink(self.path)
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a kill at any moment leaves the old content or the new, whole."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    fsync(tmp)
    os.replace(tmp, path)


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
        raise UsageError(
            f"{ckpt} has checkpoint format {meta.get('version')!r}; this fpdm reads up to {FORMAT_VERSION}"
        )
    if verify:
        for name, digest in meta.get("sha256", {}).items():
            file = ckpt / name
            if not file.is_file():
                if name in RESUME_ONLY:
                    continue
                raise UsageError(f"checkpoint file missing: {file}")
            if sha256_file(file) != digest:
                raise UsageError(f"checkpoint file corrupt (checksum mismatch): {file}")
    config, spec = _json(ckpt / "config.json"), _json(ckpt / "model.json")
    return Checkpoint(
        ckpt,
        int(meta["step"]),
        config,
        spec,
        _safetensors(ckpt / "model.safetensors"),
        _safetensors(ckpt / "ema.safetensors"),
    )


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
        first = (str(exc).splitlines() or [""])[0]
        raise UsageError(f"unreadable checkpoint file {path}: {type(exc).__name__}: {first}") from None
