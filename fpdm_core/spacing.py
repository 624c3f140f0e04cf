"""Timestep spacings: which `steps` of the `total` training timesteps a sampler visits.

`Schedule.sampling_timesteps(steps, spacing=...)` calls `spaced_timesteps`; the rules live here, below the
interfaces, so that the schedule contract, the sampling plan and the docs share one table.

- official: guided-diffusion / DiT `respace.py` (one section): stride (T - 1) / (N - 1) accumulated in a Python
  float from 0.0, each index Python's round(); both ends included. A single step starts from T - 1.
- linspace: round(linspace(0, T - 1, N)), fpdm's earlier rule (for T = 1000 it differs from official at 282 of the
  counts N = 2..1000).
- leading: arange(0, N) * (T // N); trailing: round(arange(T, 0, -T / N)) - 1, first step T - 1 (Lin et al. 2023,
  "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fpdm.errors import UsageError

SPACINGS = ("official", "linspace", "leading", "trailing")
DEFAULT_SPACING = "official"


def spaced_timesteps(total: int, steps: int, *, spacing: str = DEFAULT_SPACING) -> Tensor:
    """int64 (steps,) distinct training timesteps in 0..total-1, highest first, by the rule `spacing`."""
    if spacing not in SPACINGS:
        raise UsageError(f"spacing must be one of {', '.join(SPACINGS)}; got {spacing!r}")
    if not 1 <= steps <= total:
        raise UsageError(f"steps must be in 1..{total}, got {steps}")
    if spacing == "leading":
        ts = [i * (total // steps) for i in range(steps)]
    elif spacing == "trailing":
        # round(T - i * T / N) - 1 is trailing's arange(T, 0, -T / N) without a float arange's extra element
        ts = [round(total - i * total / steps) - 1 for i in range(steps)]
    elif steps == 1:  # one step denoises from pure noise: the last timestep (official would give 0)
        ts = [total - 1]
    elif spacing == "official":
        ts, cur, stride = [], 0.0, (total - 1) / (steps - 1)
        for _ in range(steps):
            ts.append(round(cur))
            cur += stride
    else:  # linspace
        ts = torch.linspace(0, total - 1, steps, dtype=torch.float64).round().long().tolist()
    out = torch.tensor(sorted(ts, reverse=True), dtype=torch.int64)  # (steps,), highest first
    if len(set(ts)) != steps or int(out.min()) < 0 or int(out.max()) >= total:
        raise UsageError(f"spacing {spacing!r} cannot place {steps} distinct steps in {total} timesteps")
    return out
