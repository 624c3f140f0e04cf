"""The budget allocator contract (`fpdm.interfaces.BudgetAllocator`): plans that fit the budget.

Timesteps are given in sampling order (highest first, evenly respaced over 1000 training steps, as the
sampler passes them). Every contract takes `make(**options) -> BudgetAllocator`.
"""

from __future__ import annotations

import math

from fpdm.testing.suite import Make, given, strategies


def sampling_order(steps: int, total: int = 1000) -> list[int]:
    """`steps` evenly respaced timesteps of `total`, both ends included, highest first."""
    if steps == 1:
        return [total - 1]
    return [round(i * (total - 1) / (steps - 1)) for i in range(steps)][::-1]


def plans_fit_the_budget_and_give_every_step_one(make: Make) -> None:
    """allocate(total, timesteps): one int >= 1 per timestep, summing to at most total (for any total >= steps)."""
    st = strategies()

    @given(steps=st.integers(1, 60), extra=st.integers(0, 400), ascending=st.booleans())
    def prop(steps: int, extra: int, ascending: bool) -> None:
        timesteps = sampling_order(steps)[:: -1 if ascending else 1]
        given_in = list(timesteps)
        plan = make().allocate(steps + extra, timesteps)
        where = f"allocate({steps + extra}, {steps} timesteps)"
        assert isinstance(plan, list) and len(plan) == steps, f"{where} returned {plan!r}: need a list of {steps}"
        assert all(type(n) is int and n >= 1 for n in plan), f"{where} returned {plan!r}: need ints >= 1"
        assert sum(plan) <= steps + extra, f"{where} returned {plan!r}, sum {sum(plan)} over the budget"
        assert timesteps == given_in, f"{where} modified its timesteps argument"

    prop()


def _same(a: list[float], b: list[float]) -> bool:
    """Equal lists, NaN equal to NaN (a NaN is the tolerances contract's to report, not this one's)."""
    return len(a) == len(b) and all(x == y or (x != x and y != y) for x, y in zip(a, b))


def deterministic(make: Make) -> None:
    """The same budget and timesteps always give the same plan and tolerances."""
    for steps, total in ((1, 1), (5, 23), (25, 100), (60, 61)):
        timesteps = sampling_order(steps)
        a, b = make(), make()
        plan = a.allocate(total, timesteps)
        assert plan == a.allocate(total, timesteps) == b.allocate(total, timesteps), f"{steps} steps: plans differ"
        assert _same(a.tolerances(plan, timesteps), b.tolerances(plan, timesteps)), f"{steps} steps: tolerances differ"


def tol_is_a_finite_number(make: Make) -> None:
    """`tol` is a finite float >= 0 (0: a fixed plan; > 0: the sampler may stop a step early)."""
    tol = make().tol
    assert isinstance(tol, (int, float)) and not isinstance(tol, bool), f"tol is {tol!r}"
    assert 0 <= tol < math.inf, f"tol is {tol!r}"


def tolerances_are_finite_one_per_step(make: Make) -> None:
    """tolerances(plan, timesteps): one finite number >= 0 per timestep, for the plan allocate returned."""
    st = strategies()

    @given(steps=st.integers(1, 60), extra=st.integers(0, 400))
    def prop(steps: int, extra: int) -> None:
        allocator, timesteps = make(), sampling_order(steps)
        tols = allocator.tolerances(allocator.allocate(steps + extra, timesteps), timesteps)
        assert len(tols) == steps, f"{steps} steps: {len(tols)} tolerances"
        assert all(isinstance(t, (int, float)) and 0 <= t < math.inf for t in tols), f"tolerances {tols!r}"

    prop()


CONTRACTS = (
    plans_fit_the_budget_and_give_every_step_one,
    deterministic,
    tol_is_a_finite_number,
    tolerances_are_finite_one_per_step,
)
