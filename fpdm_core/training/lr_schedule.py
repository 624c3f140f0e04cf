"""The learning rate of each optimizer step: linear warm-up, then constant, cosine or linear decay.

A pure function of the step (no scheduler object with state to save), so a resumed run takes the same learning
rate at every step as an uninterrupted one, and the optimizer's saved `lr` never matters.
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_at(
    step: int,
    *,
    lr: float,
    total_steps: int,
    schedule: str = "constant",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`.

    Warm-up: lr * (step + 1) / warmup_steps for the first `warmup_steps` steps (never 0, so no step is wasted).
    Then "constant" keeps lr; "cosine" and "linear" fall from lr towards the floor lr * min_lr_ratio, reaching
    it at `total_steps` (the last step's rate is one step's decay above it)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    floor = lr * min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))  # in [0, 1)
    if schedule == "cosine":
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr - (lr - floor) * progress
