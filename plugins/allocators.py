"""Built-in budget allocators: uniform, the paper's linear ramps, and an adaptive one."""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
from attrs import validators as v

from fpdm import hookimpl
from fpdm.errors import UsageError
from fpdm.hookspecs import Register
from fpdm.interfaces import BudgetAllocator


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Integers >= 1 proportional to `weights`, summing to exactly `total` (largest remainders).

    The paper's timestep smoothing: every step gets at least one iteration and the sum stays in budget."""
    steps = len(weights)
    if total < steps:
        raise UsageError(f"{total} iterations cannot give each of {steps} steps at least one")
    spare = total - steps  # one each first, then the rest by weight
    scale = sum(weights)
    raw = [spare * w / scale for w in weights]
    counts = [1 + math.floor(r) for r in raw]
    by_remainder = sorted(range(steps), key=lambda i: (raw[i] - math.floor(raw[i]), -i), reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


@attrs.frozen
class Uniform(BudgetAllocator):
    """The same number of iterations at every step (remainders to the earliest steps)."""

    def allocate(self, total_iters: int, timesteps: Sequence[float]) -> list[int]:
        return apportion(total_iters, [1.0] * len(timesteps))


@attrs.frozen
class LinearRamp(BudgetAllocator):
    """Weights from `start` to `end` over the steps in sampling order (high noise first).

    increasing (0.5 -> 1.5) spends more iterations at the low-noise end, decreasing (1.5 -> 0.5) the reverse:
    the paper's reallocation across timesteps."""

    start: float = attrs.field(default=0.5, converter=float, validator=v.gt(0.0))
    end: float = attrs.field(default=1.5, converter=float, validator=v.gt(0.0))

    def allocate(self, total_iters: int, timesteps: Sequence[float]) -> list[int]:
        n = len(timesteps)
        weights = [self.start + (self.end - self.start) * i / max(n - 1, 1) for i in range(n)]
        return apportion(total_iters, weights)


def increasing() -> LinearRamp:
    return LinearRamp(0.5, 1.5)


def decreasing() -> LinearRamp:
    return LinearRamp(1.5, 0.5)


@attrs.frozen
class Adaptive(BudgetAllocator):
    """Uniform caps, per-sample early stopping: a sample whose solve reaches its step's tolerance stops and
    carries the unspent iterations to its next step, so they pile up where the residual is still high (the
    slow low-noise steps). The budget stays a hard cap per sample.

    `tol` is relative to the step size: a warm-started solve begins about as far from its fixed point as x_t
    moved since the previous step, so a step covering a fraction f of the trajectory stops at f * tol
    (tol / (steps - 1) with even spacing). One fixed tolerance suits one step count only: on the demo model
    3e-2 helped at 10 steps but stopped most of a 20-step run's steps far too early, 1e-2 the reverse, 1e-3
    never triggered. 0.2 was the best of the values measured at about four iterations per step (README,
    sampling benchmark). The first step starts cold and the last has no later step to save for: both spend
    their whole caps.
    """

    tol: float = attrs.field(default=0.2, converter=float, validator=[v.gt(0.0), v.lt(math.inf)])

    def allocate(self, total_iters: int, timesteps: Sequence[float]) -> list[int]:
        return apportion(total_iters, [1.0] * len(timesteps))

    def tolerances(self, iterations: Sequence[int], timesteps: Sequence[float]) -> list[float]:
        n = len(timesteps)
        span = abs(timesteps[0] - timesteps[-1]) if n else 0
        if n < 3 or span == 0:
            return [0.0] * n
        inner = [self.tol * _gap(timesteps, i) / span for i in range(1, n - 1)]
        return [0.0, *inner, 0.0]


def _gap(timesteps: Sequence[float], i: int) -> float:
    """How far evaluation i's level is from the last different level before it: the step its warm start
    bridges. A repeated level (Heun's and UniPC's second evaluation at one level) takes its step's size."""
    j = i - 1
    while j > 0 and timesteps[j] == timesteps[i]:
        j -= 1
    return abs(timesteps[j] - timesteps[i])


@hookimpl
def register_budget_allocators(register: Register) -> None:
    register("uniform", Uniform, description="the same iterations at every step")
    register("increasing", increasing, description="linear ramp 0.5 -> 1.5: more iterations at low noise (paper)")
    register("decreasing", decreasing, description="linear ramp 1.5 -> 0.5: more iterations at high noise (paper)")
    register("ramp", LinearRamp, description="linear ramp with your own start and end weights")
    register(
        "adaptive",
        Adaptive,
        description="stop each sample's step at a step-size-relative tol; unspent iterations carry to its later steps",
    )
