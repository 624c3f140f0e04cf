"""fpdm.testing itself: each suite catches an implementation that breaks its contract, names the contract and
the implementation, and reports skips; `cases` builds one pytest case per implementation and contract."""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

import fpdm.testing
from fpdm.errors import UsageError
from fpdm.interfaces import BudgetAllocator, FixedPointDenoiser, ReusePolicy, Sampler
from fpdm.models.transformer import FPDM
from fpdm.plugins.allocators import LinearRamp, Uniform
from fpdm.plugins.reuse import Reuse
from fpdm.plugins.samplers import DDIM, DDPM
from fpdm.plugins.schedules import LinearSchedule
from fpdm.plugins.solvers import FixedPointIteration
from fpdm.testing import samplers
from fpdm.testing.suite import Case, maker
from support import REGISTRY

TINY = {"input_size": 8, "in_channels": 1, "patch_size": 2, "hidden_size": 32, "num_heads": 2, "num_classes": 3}


def broken(kind: str, contract: str, factory, **options) -> str:  # type: ignore[no-untyped-def]
    """Run one contract on `factory`; it must fail. Returns the failure's first line."""
    (case,) = [p.values[0] for p in fpdm.testing.cases(kind, factory, **options) if p.id.endswith("-" + contract)]
    with pytest.raises(AssertionError) as info:
        case.run()
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{kind} contract {contract!r} broken by "), first
    return first


# ---------------------------------------------------------------------------------------------- solvers


class StopsEarly(FixedPointIteration):
    """Spends one evaluation less than asked at tol = 0."""

    def solve(self, f, z0, *, max_iter, tol, check_every=1, trace=False):  # type: ignore[no-untyped-def]
        if tol == 0 and isinstance(max_iter, int):
            max_iter = max(max_iter - 1, 0)
        return super().solve(f, z0, max_iter=max_iter, tol=tol, check_every=check_every, trace=trace)


class AlwaysNoGrad(FixedPointIteration):
    """Switches autograd off for its caller."""

    def solve(self, f, z0, *, max_iter, tol, check_every=1, trace=False):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return super().solve(f, z0, max_iter=max_iter, tol=tol, check_every=check_every, trace=trace)


def test_solver_suite_catches_a_wrong_count_and_a_grad_toggle():
    first = broken("solver", "tol_zero_runs_exactly_max_iter", StopsEarly)
    assert "StopsEarly: tol = 0 spends exactly max_iter evaluations" in first
    broken("solver", "solve_never_toggles_grad_mode", AlwaysNoGrad)


# ---------------------------------------------------------------------------------------------- the others


class Ascending(LinearSchedule):
    def sampling_timesteps(self, steps: int, *, spacing: str = "official") -> Tensor:
        return super().sampling_timesteps(steps, spacing=spacing).flip(0)


class ZeroFirstBeta(LinearSchedule):
    def betas(self) -> Tensor:
        betas = super().betas().clone()
        betas[0] = 0.0
        return betas


class OverBudget(Uniform):
    def allocate(self, total_iters: int, timesteps: Sequence[int]) -> list[int]:
        return [n + 1 for n in super().allocate(total_iters, timesteps)]


class NanTolerances(BudgetAllocator):
    tol = 0.1

    def allocate(self, total_iters: int, timesteps: Sequence[int]) -> list[int]:
        return [1] * len(timesteps)

    def tolerances(self, iterations: Sequence[int], timesteps: Sequence[int]) -> list[float]:
        return [float("nan")] * len(timesteps)


def test_check_functions_run_every_contract_pass_options_and_stop_at_the_first_broken_one():
    outcome = fpdm.testing.check_allocator(LinearRamp, start=2.0, end=0.25)
    assert list(outcome) == [c.__name__ for c in fpdm.testing.contracts("allocator")]
    assert set(outcome.values()) == {"passed"}
    with pytest.raises(
        AssertionError, match="^allocator contract 'tolerances_are_finite_one_per_step' broken by NanTolerances"
    ):
        fpdm.testing.check_allocator(NanTolerances)


class BatchMean(ReusePolicy):
    """Starts every row from the batch mean: row b depends on the other rows."""

    def init(self, solutions: Sequence[Tensor], step: int) -> Tensor | None:
        return solutions[-1].mean(0, keepdim=True).expand_as(solutions[-1]) if solutions else None


class ZerosWhenCold(Reuse):
    def init(self, solutions: Sequence[Tensor], step: int) -> Tensor | None:
        return super().init(solutions, step) if solutions else torch.zeros(1)


def test_schedule_allocator_and_reuse_suites_catch_broken_implementations():
    broken("schedule", "sampling_timesteps_start_at_the_noisiest_step_and_decrease", Ascending, num_train_timesteps=50)
    broken("schedule", "betas_are_float64_in_the_unit_interval", ZeroFirstBeta)
    broken("allocator", "plans_fit_the_budget_and_give_every_step_one", OverBudget)
    broken("allocator", "tolerances_are_finite_one_per_step", NanTolerances)
    broken("reuse_policy", "rows_are_independent_and_inputs_untouched", BatchMean)
    broken("reuse_policy", "cold_without_solutions", ZerosWhenCold)


class MiscountsBlocks(FPDM):
    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = super().forward(*args, **kwargs)
        return type(out)(out.pred, out.z, out.stats, out.blocks + 1)


class SolvesWithGrad(FPDM):
    """Runs the `iters` phase with autograd: z carries a graph through every iteration."""

    def forward(self, x, t, y, *, z0=None, iters, solver=None, tol=0.0, grad_iters=0):  # type: ignore[no-untyped-def]
        problem = self.prepare(x, t, y)
        z = problem.start if z0 is None else z0
        for _ in range(int(iters)):
            z = problem.f(z)
        out = super().forward(x, t, y, z0=z, iters=0, solver=solver, tol=tol, grad_iters=grad_iters)
        return type(out)(out.pred, out.z, out.stats, out.blocks + int(iters))


def test_denoiser_suite_catches_miscounted_blocks_and_a_grad_phase_that_keeps_the_graph():
    assert issubclass(MiscountsBlocks, FixedPointDenoiser)
    broken("denoiser", "blocks_are_counted", MiscountsBlocks, **TINY)
    broken("denoiser", "grad_phase_carries_the_gradient", SolvesWithGrad, **TINY)


class WritesNothing:
    def export(self, model, *, solver, solver_info, config, spec, source, out):  # type: ignore[no-untyped-def]
        return {"path": str(out), "iters": 3}


class WritesBytes:
    """Writes a file and refuses solvers that cannot unroll, but the file is no model."""

    def export(self, model, *, solver, solver_info, config, spec, source, out):  # type: ignore[no-untyped-def]
        if isinstance(model, FixedPointDenoiser) and not solver.can_unroll:
            raise UsageError("solver cannot be unrolled")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"not onnx")
        return {"path": str(out), "iters": 3}


def test_exporter_suite_catches_a_missing_file_and_skips_without_onnxruntime(monkeypatch):
    pytest.importorskip("onnx")
    broken("exporter", "writes_the_out_file_and_reports_it", WritesNothing)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    outcome = fpdm.testing.check_exporter(WritesBytes)
    assert outcome == {
        "writes_the_out_file_and_reports_it": "passed",
        "exported_step_reproduces_the_denoiser": "skipped: needs onnxruntime",
        "refuses_a_solver_that_cannot_unroll": "passed",
    }
    (case,) = [
        p.values[0]
        for p in fpdm.testing.cases("exporter", WritesBytes)
        if p.id == "WritesBytes-exported_step_reproduces_the_denoiser"
    ]
    with pytest.raises(pytest.skip.Exception, match="needs onnxruntime"):
        case()


# ---------------------------------------------------------------------------------------------- samplers


class ClaimsSecondOrder(DDIM):
    """DDIM, a first-order method, declaring order 2."""

    order = 2


class EvaluatesOnceMore(DDIM):
    """Calls the model once more than `levels` declares (a final re-evaluation at index 0)."""

    def __call__(self, evaluate, x, diffusion, *, noise):  # type: ignore[no-untyped-def]
        x = super().__call__(evaluate, x, diffusion, noise=noise)
        return evaluate(x, 0).x0


class HidesItsNoise(DDPM):
    """Ancestral sampling, declared deterministic."""

    @property
    def deterministic(self) -> bool:
        return True


class IgnoresItsNoise(DDPM):
    """Draws noise and throws it away: stochastic in name only."""

    def __call__(self, evaluate, x, diffusion, *, noise):  # type: ignore[no-untyped-def]
        return super().__call__(evaluate, x, diffusion, noise=lambda k: 0 * noise(k))


class DoublesItsNoise(DDPM):
    """Ancestral sampling with twice the posterior's standard deviation: the wrong law at every step count."""

    def __call__(self, evaluate, x, diffusion, *, noise):  # type: ignore[no-untyped-def]
        return super().__call__(evaluate, x, diffusion, noise=lambda k: 2 * noise(k))


class RecoversX0FromEps(Sampler):
    """DDIM through x0 = (x - sigma eps) / alpha: 0 / 0 at zero terminal SNR."""

    def __call__(self, evaluate, x, diffusion, *, noise):  # type: ignore[no-untyped-def]
        for i in reversed(range(diffusion.num_timesteps)):
            eps = evaluate(x, i).eps
            ac, prev = float(diffusion.alphas_cumprod[i]), float(diffusion.alphas_cumprod_prev[i])
            x0 = (x - math.sqrt(1 - ac) * eps) / math.sqrt(ac)
            x = math.sqrt(prev) * x0 + math.sqrt(1 - prev) * eps
        return x


@pytest.mark.parametrize(
    ("contract", "sampler"),
    [
        ("order_on_gaussian_data", ClaimsSecondOrder),
        ("order_on_gaussian_data", DoublesItsNoise),
        ("evaluations_and_draws_as_declared", EvaluatesOnceMore),
        ("evaluations_and_draws_as_declared", HidesItsNoise),
        ("reproducible", IgnoresItsNoise),
        ("finite_under_zero_terminal_snr", RecoversX0FromEps),
    ],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_sampler_suite_catches_a_false_order_a_wrong_law_miscounted_evaluations_and_misused_noise(contract, sampler):
    first = broken("sampler", contract, sampler)
    assert f"broken by {sampler.__name__}: " in first


def test_the_order_test_switches_lowering_off_where_a_sampler_has_the_options():
    seen = []

    def lowering(*, lower_order_warmup: bool = True, lower_order_final: bool = True) -> DDIM:
        seen.append((lower_order_warmup, lower_order_final))
        return DDIM()

    def final_only(*, lower_order_final: bool = True) -> DDIM:
        seen.append(lower_order_final)
        return DDIM()

    samplers.without_lowering(maker(lowering, {}))
    samplers.without_lowering(maker(final_only, {}))
    assert isinstance(samplers.without_lowering(maker(DDIM, {"eta": 0.0})), DDIM)  # DDIM has neither option
    assert seen == [(False, False), False]


# ---------------------------------------------------------------------------------------------- cases


def test_cases_cover_every_registered_name_and_contract_with_readable_ids():
    params = fpdm.testing.cases("allocator", REGISTRY)
    names, contracts = REGISTRY.names("allocator"), fpdm.testing.contracts("allocator")
    assert [p.id for p in params] == [f"{n}-{c.__name__}" for n in names for c in contracts]
    assert all(isinstance(p.values[0], Case) for p in params)
    mapping = fpdm.testing.cases("reuse_policy", {"mine": functools.partial(Reuse)})
    assert {p.id.split("-")[0] for p in mapping} == {"mine"}
    with pytest.raises(KeyError, match="no conformance suite for 'nope'; suites: solver, schedule"):
        fpdm.testing.cases("nope", Reuse)
