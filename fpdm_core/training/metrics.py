"""The training log: what one logging window records (`LogWindow`), and where it goes: RUN/metrics.jsonl always,
TensorBoard event files in RUN/tb/ when asked (`MetricsLog`).

TensorBoard is optional: `train.tensorboard = true` without the package installed is refused before training
starts, in one line that says how to install it.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

from fpdm.errors import UsageError
from fpdm.io.checkpoint import write_text_atomic


def check_tensorboard() -> None:
    """Refuse `train.tensorboard = true` early (before data and model are built) when tensorboard is missing."""
    try:  # torch.utils.tensorboard needs the package itself; only its presence matters here (it has no stubs)
        importlib.import_module("tensorboard")
    except ImportError:
        raise UsageError("train.tensorboard = true needs the tensorboard package: pip install tensorboard") from None


class MetricsLog:
    """Appends each logging window's record to metrics.jsonl and, with `tensorboard`, writes its numbers as
    scalars to RUN/tb/ at global step = record["step"]. `start` is the step the run continues from: TensorBoard
    drops the events a killed run wrote after it (purge_step), as `trim_metrics` does for the JSONL."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, start: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._writer: Any = None
        if tensorboard:
            check_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            # Records are stamped with steps done (1-based): the resumed run's first is start + 1.
            self._writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start + 1)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"train/{key}", value, record["step"])
            self._writer.flush()  # a live TensorBoard shows each window as soon as it is logged

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class LogWindow:
    """Sums over the optimizer steps of one logging window; `record` turns them into the logged means."""

    def __init__(self) -> None:
        self.n = 0  # optimizer steps taken (skipped non-finite batches are counted apart)
        self.skipped = 0
        self.sums: dict[str, float] = {}
        self.residual_n = 0
        self.grad_norm_max = 0.0
        self.lr = math.nan

    def add(
        self,
        means: dict[str, float],
        residual: float | None,
        n_no_grad: int,
        n_grad: int,
        *,
        grad_norm: float,
        grad_clip: float,
        lr: float,
    ) -> None:
        """One optimizer step: its loss means and no-grad residual (None for DiT), S-JFB counts, gradient norm
        before clipping (`grad_clip` 0: no clipping) and learning rate."""
        self.n += 1
        scale = min(1.0, grad_clip / grad_norm) if grad_clip > 0 and grad_norm > 0 else 1.0  # clip_grad_norm_'s
        values = {
            **means,
            "no_grad_iters": n_no_grad,
            "grad_iters": n_grad,
            "grad_norm": grad_norm,
            "clipped": float(scale < 1.0),
            "clip_scale": scale,
        }
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        if residual is not None:
            self.sums["fp_residual"] = self.sums.get("fp_residual", 0.0) + residual
            self.residual_n += 1
        self.grad_norm_max, self.lr = max(self.grad_norm_max, grad_norm), lr

    def record(self, step: int, img_per_s: float, elapsed: float) -> dict[str, Any]:
        """Window means (fp_residual over the steps that had one; "clipped" is the fraction of steps clipped,
        "clip_scale" the mean factor clipping applied, 1 = none), the largest gradient norm and the last lr."""
        record: dict[str, Any] = {"step": step}
        for key, total in self.sums.items():
            record[key] = total / (self.residual_n if key == "fp_residual" else self.n)
        record.update(grad_norm_max=self.grad_norm_max, lr=self.lr)
        if self.skipped:
            record["skipped"] = self.skipped
        record.update(img_per_s=img_per_s, elapsed_s=elapsed)
        return record


def trim_metrics(path: Path, step: int) -> None:
    """Keep the whole records of metrics.jsonl up to `step`, so a resumed run's log has each step once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))
