"""Timestep spacings: which `steps` of the `total` training timesteps a sampler visits.

`Schedule.sampling_timesteps(steps, spacing=...)` calls `spaced_timesteps`; the rules live here, below the
interfaces, so that the schedule contract, the sampling plan and the docs share one table.

- official: guided-diffusion / DiT `respace.py` (one section): stride (T - 1) / (N - 1) accumulated in a Python
  float from 0.0, each index Python's round(); both ends included. A single step starts from T - 1.
- linspace: round(linspace(0, T - 1, N)), fpdm's earlier rule (for T = 1000 it differs from official at 282 of the
  counts N = 2..1000).
- leading: arange(0, N) * (T // N); trailing: round(arange(T, 0, -T / N)) - 1, first step T - 1 (Lin et al. 2023,
  "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2).
- karras: the noise levels of Karras et al. 2022 ("Elucidating the Design Space...", eq. 5, rho = 7) between the
  schedule's smallest and largest finite sigma = sqrt((1 - ac) / ac), as fractional training timesteps (log sigma
  interpolated linearly between neighbouring timesteps). It needs the schedule's alphas_cumprod, so
  `Schedule.sampling_timesteps` places it (`karras_timesteps`), not `spaced_timesteps`. Under a zero-terminal-SNR
  schedule the last timestep's sigma is infinite: the karras levels then start at the largest finite one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fpdm.errors import UsageError

SPACINGS = ("official", "linspace", "leading", "trailing", "karras")
DEFAULT_SPACING = "official"
KARRAS_RHO = 7.0


def spaced_timesteps(total: int, steps: int, *, spacing: str = DEFAULT_SPACING) -> Tensor:
    """int64 (steps,) distinct training timesteps in 0..total-1, highest first, by the rule `spacing`."""
    check_spacing(total, steps, spacing)
    if spacing == "karras":
        raise UsageError("karras spacing needs the schedule's noise levels: use Schedule.sampling_timesteps")
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


def check_spacing(total: int, steps: int, spacing: str) -> None:
    """A UsageError for an unknown spacing (listing the known ones) or steps outside 1..total."""
    if spacing not in SPACINGS:
        raise UsageError(f"unknown spacing {spacing!r}; known: {', '.join(SPACINGS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
        raise UsageError(f"steps must be in 1..{total} (the training timesteps), got {steps!r}")


def log_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """float64 (T,) log sigma = 0.5 log((1 - ac) / ac) of each training timestep; +inf where ac = 0 (zero SNR)."""
    ac = alphas_cumprod.to(torch.float64)
    return 0.5 * (torch.log1p(-ac) - torch.log(ac))


def karras_timesteps(alphas_cumprod: Tensor, steps: int, *, rho: float = KARRAS_RHO) -> Tensor:
    """float64 (steps,) fractional training timesteps, highest first, at Karras et al.'s sigmas
    (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1; one step: sigma_max."""
    total = int(alphas_cumprod.shape[0])
    check_spacing(total, steps, "karras")
    logs = log_sigmas(alphas_cumprod)  # (T,), increasing with t
    finite = torch.isfinite(logs)
    if int(finite.sum()) < 2:
        raise UsageError("karras spacing needs at least two timesteps of finite noise level")
    grid = torch.arange(total, dtype=torch.float64)[finite]
    logs = logs[finite]
    lo, hi = logs[0].exp().item() ** (1 / rho), logs[-1].exp().item() ** (1 / rho)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    targets = ((hi + ramp * (lo - hi)) ** rho).log()  # (steps,) log sigma, largest first
    out = interp(targets, logs, grid).clamp(float(grid[0]), float(grid[-1]))
    return torch.where((out - out.round()).abs() < 1e-9, out.round(), out)  # the ends land on whole steps


def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of the points (xp, fp) at x (xp increasing), float64; clamps outside."""
    idx = torch.searchsorted(xp, x).clamp(1, xp.shape[0] - 1)  # right neighbour
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return f0 + w * (f1 - f0)
