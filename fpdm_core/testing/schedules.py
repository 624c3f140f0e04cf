"""The schedule contract (`fpdm.interfaces.Schedule`): valid noise levels and valid sampling timesteps.

Every contract takes `make(**options) -> Schedule`.
"""

from __future__ import annotations

import torch

from fpdm.errors import UsageError
from fpdm.interfaces import Schedule
from fpdm.spacing import SPACINGS
from fpdm.testing.suite import Make, given, strategies


def _betas(schedule: Schedule) -> torch.Tensor:
    betas = schedule.betas()
    assert isinstance(betas, torch.Tensor), f"betas() returned {type(betas).__name__}, not a Tensor"
    return betas


def betas_are_float64_in_the_unit_interval(make: Make) -> None:
    """betas() is a float64 (T,) tensor, T = num_train_timesteps >= 1, every beta in (0, 1]."""
    schedule = make()
    betas = _betas(schedule)
    assert betas.dtype == torch.float64 and betas.dim() == 1, (betas.dtype, tuple(betas.shape))
    assert betas.shape[0] == schedule.num_train_timesteps >= 1, (betas.shape, schedule.num_train_timesteps)
    assert torch.isfinite(betas).all(), "non-finite betas"
    assert ((betas > 0) & (betas <= 1)).all(), f"betas outside (0, 1]: min {betas.min()}, max {betas.max()}"


def alphas_cumprod_is_the_decreasing_product(make: Make) -> None:
    """alphas_cumprod() is cumprod(1 - betas), float64 (T,), strictly decreasing from below 1 to >= 0."""
    schedule = make()
    betas, ac = _betas(schedule), schedule.alphas_cumprod()
    assert ac.dtype == torch.float64 and ac.shape == betas.shape, (ac.dtype, tuple(ac.shape))
    torch.testing.assert_close(ac, torch.cumprod(1.0 - betas, dim=0), rtol=1e-9, atol=1e-12)
    assert 0 < ac[0] < 1 and ac[-1] >= 0, (ac[0].item(), ac[-1].item())
    assert (ac[1:] < ac[:-1]).all(), "alphas_cumprod must decrease at every step (every beta > 0)"


def _first_last(spacing: str, total: int, steps: int) -> tuple[int, int]:
    """The first and last timestep each rule gives (`fpdm.spacing`'s table)."""
    if spacing == "leading":
        return (steps - 1) * (total // steps), 0
    if spacing == "trailing":
        return total - 1, round(total / steps) - 1
    return total - 1, 0 if steps > 1 else total - 1  # official and linspace: both ends; one step: the last


def sampling_timesteps_start_at_the_noisiest_step_and_decrease(make: Make) -> None:
    """sampling_timesteps(S, spacing=...) for every spacing and S in 1..T: (S,), distinct, in 0..T-1, highest first,
    with the rule's first and last timestep (official, linspace, trailing start at T-1); int64, and T steps visit
    all, except karras: float64 levels from the noisiest finite sigma down to 0."""
    st = strategies()
    schedule = make()
    total = schedule.num_train_timesteps
    integer = [spacing for spacing in SPACINGS if spacing != "karras"]

    @given(steps=st.integers(1, total), spacing=st.sampled_from(SPACINGS))
    def prop(steps: int, spacing: str) -> None:
        ts = schedule.sampling_timesteps(steps, spacing=spacing)
        what = f"{steps} steps, spacing {spacing}"
        assert isinstance(ts, torch.Tensor) and ts.shape == (steps,), f"{what}: {ts!r}"
        assert (ts[1:] < ts[:-1]).all(), f"{what}: not strictly decreasing: {ts.tolist()}"
        if spacing == "karras":
            assert ts.dtype == torch.float64, f"{what}: {ts!r}"
            assert float(ts.min()) >= 0 and float(ts.max()) <= total - 1, f"{what}: {ts.tolist()}"
            assert steps == 1 or float(ts[-1]) == 0.0, f"{what}: must end at timestep 0: {ts.tolist()}"
            return
        assert ts.dtype == torch.int64, f"{what}: {ts!r}"
        first, last = _first_last(spacing, total, steps)
        assert (int(ts[0]), int(ts[-1])) == (first, last), (
            f"{what}: runs {int(ts[0])}..{int(ts[-1])}, not {first}..{last}"
        )
        assert int(ts.min()) >= 0, f"{what}: below 0: {ts.tolist()}"

    prop()
    for spacing in integer:
        every = schedule.sampling_timesteps(total, spacing=spacing)
        assert every.tolist() == list(range(total - 1, -1, -1)), f"T steps must visit every timestep ({spacing})"


def impossible_step_counts_are_usage_errors(make: Make) -> None:
    """sampling_timesteps(0) and sampling_timesteps(T + 1) raise UsageError under every spacing, and so does an
    unknown spacing name."""
    schedule = make()
    calls = [(steps, spacing) for spacing in SPACINGS for steps in (0, schedule.num_train_timesteps + 1)]
    for steps, spacing in [*calls, (1, "no-such-spacing")]:
        try:
            schedule.sampling_timesteps(steps, spacing=spacing)
        except UsageError:
            continue
        raise AssertionError(
            f"sampling_timesteps({steps}, spacing={spacing!r}) must raise UsageError "
            f"(T = {schedule.num_train_timesteps})"
        )


def deterministic(make: Make) -> None:
    """Two instances with the same options give identical betas and timesteps."""
    a, b = make(), make()
    assert torch.equal(_betas(a), _betas(b)) and torch.equal(_betas(a), _betas(a)), "betas differ between calls"
    steps = min(10, a.num_train_timesteps)
    for spacing in SPACINGS:
        same = torch.equal(a.sampling_timesteps(steps, spacing=spacing), b.sampling_timesteps(steps, spacing=spacing))
        assert same, f"timesteps differ between calls ({spacing})"


CONTRACTS = (
    betas_are_float64_in_the_unit_interval,
    alphas_cumprod_is_the_decreasing_product,
    sampling_timesteps_start_at_the_noisiest_step_and_decrease,
    impossible_step_counts_are_usage_errors,
    deterministic,
)
