"""The reuse policy contract (`fpdm.interfaces.ReusePolicy`): where each step's fixed-point solve starts.

The sampling run keeps the last `history` solutions (oldest first) with the model timestep each was found at,
and asks `warm_start(solutions, step, levels=..., level=...)` (by default `init(solutions, step)`) for z0, or
None for a cold start. The contracts call `warm_start` with uneven, decreasing levels, and with a repeated
level (Heun and UniPC evaluate twice at one). Every contract takes `make(**options) -> ReusePolicy`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fpdm.interfaces import ReusePolicy
from fpdm.testing.suite import Make, given, strategies


def _solutions(count: int, batch: int, seed: int, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 4, 8, generator=gen).to(dtype) for _ in range(count)]  # (B, T, D) each


def _start(policy: ReusePolicy, solutions: list[Tensor], step: int, *, repeat: bool = False) -> Tensor | None:
    """`warm_start` as a sampling run calls it: solutions found at uneven decreasing model timesteps, the next
    evaluation below them (or at the last one's level again with `repeat`)."""
    levels = [999.0 - 37.5 * k * (k + 1) for k in range(len(solutions))]  # 999, 924, 774, ...: uneven
    level = levels[-1] if repeat and levels else (levels[-1] - 200.0 if levels else 999.0)
    return policy.warm_start(solutions, step, levels=levels, level=level)


def history_is_a_count(make: Make) -> None:
    """`history` is an int >= 0: how many earlier solutions the sampler keeps for init."""
    history = make().history
    assert type(history) is int and history >= 0, f"history is {history!r}"


def cold_without_solutions(make: Make) -> None:
    """With no earlier solution (step 0, or history 0) init returns None: a cold start."""
    policy = make()
    for step in (0, 1, 7):
        assert _start(policy, [], step) is None, f"warm_start([], {step}) must be None"


def start_has_the_solution_shape(make: Make) -> None:
    """With `history` solutions, init returns None or a finite tensor of the solutions' shape, dtype and device."""
    st = strategies()
    policy = make()
    if policy.history == 0:
        return

    @given(
        batch=st.integers(1, 4),
        step=st.integers(1, 50),
        seed=st.integers(0, 2**31 - 1),
        half=st.booleans(),
        repeat=st.booleans(),
    )
    def prop(batch: int, step: int, seed: int, half: bool, repeat: bool) -> None:
        for count in range(1, policy.history + 1):
            solutions = _solutions(count, batch, seed, torch.bfloat16 if half else torch.float32)
            z0 = _start(policy, solutions, max(step, count), repeat=repeat)
            if z0 is None:
                continue
            assert isinstance(z0, Tensor), f"warm_start returned {type(z0).__name__}"
            like = solutions[-1]
            assert (z0.shape, z0.dtype, z0.device) == (like.shape, like.dtype, like.device), (z0.shape, z0.dtype)
            assert torch.isfinite(z0).all(), "warm_start returned non-finite values from finite solutions"

    prop()


def rows_are_independent_and_inputs_untouched(make: Make) -> None:
    """Row b of z0 depends only on row b of the solutions (images do not depend on the batch), and init
    leaves the solutions it is given unchanged."""
    policy = make()
    count = max(policy.history, 1)
    solutions = _solutions(count, 3, 0)
    kept = [s.clone() for s in solutions]
    together = _start(policy, solutions, count)
    assert all(torch.equal(a, b) for a, b in zip(solutions, kept)), "warm_start modified the solutions in place"
    for row in range(3):
        alone = _start(policy, [s[row : row + 1] for s in solutions], count)
        assert (alone is None) == (together is None), "warm_start chose differently for one row than for the batch"
        if alone is not None and together is not None:
            torch.testing.assert_close(together[row : row + 1], alone)


def deterministic(make: Make) -> None:
    """The same solutions and step always give the same start."""
    count = max(make().history, 1)
    solutions = _solutions(count, 2, 1)
    a, b = _start(make(), solutions, count), _start(make(), solutions, count)
    assert (a is None) == (b is None), "two calls chose differently between a cold and a warm start"
    assert a is None or b is None or torch.equal(a, b), "two calls gave different starts"


CONTRACTS = (
    history_is_a_count,
    cold_without_solutions,
    start_has_the_solution_shape,
    rows_are_independent_and_inputs_untouched,
    deterministic,
)
