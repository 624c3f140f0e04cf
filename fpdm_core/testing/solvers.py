"""The solver contract (`fpdm.interfaces.Solver`), as properties with known answers.

The oracles are in `fpdm.testing.maps`: the closed-form fixed point of linear contractions, a converged
reference for tanh contractions, and the contraction bound ||z - z*|| <= L / (1 - L) * ||f(z_k) - z_k||.
Every contract takes `make(**options) -> Solver`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fpdm.errors import UsageError
from fpdm.interfaces import SolverResult
from fpdm.testing.maps import Plain, Rowwise, linear, tanh
from fpdm.testing.suite import Make, given, strategies


def _seeds() -> object:
    return strategies().integers(0, 2**31 - 1)


def _contraction_bound(z: Tensor, truth: Tensor, rate: float, tol: float) -> None:
    """Returned z = f(z_k) with ||f(z_k) - z_k|| <= tol ||f(z_k)||, so ||z - z*|| <= L/(1-L) tol ||z||."""
    err = (z - truth).flatten(1).norm(dim=1)
    bound = rate / (1 - rate) * tol * z.flatten(1).norm(dim=1) * 1.01 + 1e-10
    assert torch.all(err <= bound), f"distance to the true fixed point {err.tolist()} > bound {bound.tolist()}"


def linear_contraction_reaches_tol_and_the_exact_fixed_point(make: Make) -> None:
    """On linear contractions, every sample converges to tol and lands within the contraction bound of z*."""
    st = strategies()

    @given(
        batch=st.integers(1, 4),
        t=st.integers(1, 3),
        n=st.integers(2, 12),
        rate=st.floats(0.0, 0.95),
        seed=_seeds(),
        tol=st.sampled_from([1e-3, 1e-6]),
    )
    def prop(batch: int, t: int, n: int, rate: float, seed: int, tol: float) -> None:
        f = linear(batch, t, n, rate, seed)
        result = make().solve(f, torch.zeros_like(f.b), max_iter=2000, tol=tol)
        assert isinstance(result, SolverResult), f"solve returned {type(result).__name__}, not a SolverResult"
        assert result.stats.converged.all() and (result.stats.residual <= tol).all(), result.stats
        _contraction_bound(result.z, f.exact(), rate, tol)

    prop()


def tanh_contraction_reaches_tol_and_the_reference(make: Make) -> None:
    """On tanh contractions, every sample converges and the residual of the returned z itself is <= L * tol."""
    st = strategies()

    @given(batch=st.integers(1, 4), t=st.integers(1, 3), n=st.integers(2, 12), rate=st.floats(0.0, 0.95), seed=_seeds())
    def prop(batch: int, t: int, n: int, rate: float, seed: int) -> None:
        f, tol = tanh(batch, t, n, rate, seed), 1e-6
        result = make().solve(f, torch.zeros_like(f.inj), max_iter=2000, tol=tol)
        assert result.stats.converged.all(), result.stats
        _contraction_bound(result.z, f.reference(), rate, tol)
        own = (f(result.z) - result.z).flatten(1).norm(dim=1) / result.z.flatten(1).norm(dim=1)
        assert torch.all(own <= max(rate, 1e-3) * tol * 1.01 + 1e-12), f"own residual {own.tolist()}"

    prop()


def start_at_the_fixed_point_costs_at_most_one_iteration(make: Make) -> None:
    """Started at the exact fixed point, a solve converges after at most one evaluation."""
    st = strategies()

    @given(batch=st.integers(1, 4), n=st.integers(2, 12), rate=st.floats(0.0, 0.95), seed=_seeds())
    def prop(batch: int, n: int, rate: float, seed: int) -> None:
        f = linear(batch, 2, n, rate, seed)
        result = make().solve(f, f.exact(), max_iter=50, tol=1e-8)
        assert (result.stats.iterations <= 1).all() and result.stats.converged.all(), result.stats

    prop()


def tol_zero_runs_exactly_max_iter(make: Make) -> None:
    """tol = 0 spends exactly max_iter evaluations on every sample; max_iter = 0 returns z0."""
    st = strategies()

    @given(batch=st.integers(1, 4), n=st.integers(2, 12), seed=_seeds(), max_iter=st.integers(0, 15))
    def prop(batch: int, n: int, seed: int, max_iter: int) -> None:
        f = linear(batch, 2, n, 0.5, seed)
        result = make().solve(f, torch.zeros_like(f.b), max_iter=max_iter, tol=0.0)
        assert result.stats.iterations.tolist() == [max_iter] * batch, result.stats.iterations
        if max_iter == 0:
            assert torch.equal(result.z, torch.zeros_like(f.b)), "max_iter=0 must return z0"

    prop()


def batch_rows_are_independent(make: Make) -> None:
    """Each row of a mixed batch stops and ends exactly as it would when solved alone (per-sample stopping)."""
    st = strategies()

    @given(batch=st.integers(2, 5), n=st.integers(2, 12), seed=_seeds(), restrictable=st.booleans())
    def prop(batch: int, n: int, seed: int, restrictable: bool) -> None:
        rates = torch.linspace(0.1, 0.95, batch).tolist()
        rows = [linear(1, 2, n, rate, seed + i) for i, rate in enumerate(rates)]
        b = torch.cat([r.b for r in rows])
        solver = make()
        f: Callable[[Tensor], Tensor] = Rowwise(list(rows)) if restrictable else Plain(Rowwise(list(rows)))
        together = solver.solve(f, torch.zeros_like(b), max_iter=2000, tol=1e-6)
        alone = [solver.solve(r, torch.zeros_like(r.b), max_iter=2000, tol=1e-6) for r in rows]
        assert together.stats.iterations.tolist() == [a.stats.iterations.item() for a in alone]
        torch.testing.assert_close(together.z, torch.cat([a.z for a in alone]), rtol=1e-9, atol=1e-12)

    prop()


def check_every_k_keeps_per_sample_results(make: Make) -> None:
    """check_every=k looks less often but gives the same per-sample iterations, estimates and residuals."""
    st = strategies()

    @given(n=st.integers(2, 12), seed=_seeds(), check_every=st.integers(2, 7), restrictable=st.booleans())
    def prop(n: int, seed: int, check_every: int, restrictable: bool) -> None:
        rows = [linear(1, 2, n, rate, seed + i) for i, rate in enumerate([0.2, 0.6, 0.9])]
        z0 = torch.zeros(3, 2, n, dtype=torch.float64)
        solver = make()
        every = solver.solve(Rowwise(list(rows)), z0, max_iter=2000, tol=1e-6)
        f: Callable[[Tensor], Tensor] = Rowwise(list(rows)) if restrictable else Plain(Rowwise(list(rows)))
        sparse = solver.solve(f, z0, max_iter=2000, tol=1e-6, check_every=check_every)
        assert sparse.stats.iterations.tolist() == every.stats.iterations.tolist()
        torch.testing.assert_close(sparse.z, every.z, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sparse.stats.residual, every.stats.residual)

    prop()


def deterministic(make: Make) -> None:
    """Two solves of the same problem give identical estimates, counts and traces."""
    st = strategies()

    @given(batch=st.integers(1, 4), n=st.integers(2, 12), rate=st.floats(0.0, 0.95), seed=_seeds())
    def prop(batch: int, n: int, rate: float, seed: int) -> None:
        f = tanh(batch, 2, n, rate, seed)
        a = make().solve(f, torch.zeros_like(f.inj), max_iter=500, tol=1e-5, trace=True)
        b = make().solve(f, torch.zeros_like(f.inj), max_iter=500, tol=1e-5, trace=True)
        assert torch.equal(a.z, b.z) and torch.equal(a.stats.iterations, b.stats.iterations)
        assert a.stats.trace is not None and b.stats.trace is not None, "trace=True must return a trace"
        assert torch.equal(a.stats.trace.nan_to_num(-1), b.stats.trace.nan_to_num(-1))

    prop()


def result_shapes_dtypes_and_trace(make: Make) -> None:
    """z keeps z0's shape and dtype; stats are int64/float32/bool (B,); trace (B, max_iter) is NaN after a stop."""
    f = tanh(3, 4, 8, 0.8, 1)
    z0 = torch.zeros_like(f.inj)
    result = make().solve(f, z0, max_iter=40, tol=1e-6, trace=True)
    stats = result.stats
    assert result.z.shape == z0.shape and result.z.dtype == z0.dtype, (result.z.shape, result.z.dtype)
    assert stats.iterations.dtype == torch.int64 and stats.iterations.shape == (3,), stats.iterations
    assert stats.residual.dtype == torch.float32 and stats.converged.dtype == torch.bool, stats
    assert stats.trace is not None and stats.trace.shape == (3, 40), stats.trace
    for row, its in enumerate(stats.iterations.tolist()):
        assert torch.isfinite(stats.trace[row, :its]).all() and torch.isnan(stats.trace[row, its:]).all()
        assert stats.trace[row, its - 1] == stats.residual[row], "the reported residual is the last traced one"
    keys = {"iterations_mean", "iterations_max", "residual_mean", "residual_max", "converged_fraction"}
    assert set(stats.summary()) == keys, stats.summary()


def _bad_map(kind: str, calls: list[int]) -> Callable[[Tensor], Tensor]:
    def f(z: Tensor) -> Tensor:
        calls.append(1)
        if kind == "no_fixed_point":  # jumps across 0 and grows: relative residual >= 1 everywhere
            return torch.where(z >= 0, -(z + 1), 1 - z)
        if kind == "overflow":  # z^2 - z + 10 > 0: no real fixed point, residual >= 0.84, plain iteration overflows
            return z * z + 10
        if kind == "nan_after_1":
            return z * 0.5 + (math.nan if len(calls) > 1 else 0.0)
        out = 0.5 * z
        out[::2] = math.inf  # rows 0 and 2 blow up at once; rows 1 and 3 converge
        return out

    return f


def diverging_or_nan_maps_stop_unconverged_with_a_finite_estimate(make: Make) -> None:
    """Maps without a fixed point or going NaN/inf stop unconverged, within max_iter, with a finite estimate."""
    z0, max_iter = torch.ones(4, 2, 6, dtype=torch.float32), 100
    for kind in ("no_fixed_point", "overflow", "nan_after_1", "inf_rows"):
        for tol in (1e-4, 0.0):
            calls: list[int] = []
            result = make().solve(_bad_map(kind, calls), z0, max_iter=max_iter, tol=tol)
            where = f"map {kind!r}, tol={tol}"
            assert torch.isfinite(result.z).all(), f"{where}: non-finite estimate"
            assert len(calls) <= max_iter, f"{where}: {len(calls)} evaluations > max_iter"
            if kind == "inf_rows":
                assert not result.stats.converged[::2].any(), f"{where}: an inf row reads as converged"
                assert result.stats.converged[1::2].all() or not tol, f"{where}: the finite rows did not converge"
                assert torch.equal(result.z[::2], z0[::2]), f"{where}: a row that never saw a finite image keeps z0"
            else:
                assert not result.stats.converged.any(), f"{where}: reads as converged"
                assert not (result.stats.residual <= 0.5).any(), f"{where}: residual {result.stats.residual}"


def unrolled_form_equals_a_fixed_count_solve(make: Make) -> None:
    """`unrolled(f, z0, iters=k)` equals `solve(f, z0, max_iter=k, tol=0).z`; without one it is a UsageError."""
    st = strategies()
    if not make().can_unroll:
        try:
            make().unrolled(lambda z: z, torch.zeros(1, 1), iters=1)
        except UsageError as exc:
            assert "unrolled" in str(exc), f"the error must say the solver cannot be unrolled: {exc}"
            return
        raise AssertionError("a solver without an unrolled form must raise UsageError from unrolled()")

    @given(batch=st.integers(1, 4), n=st.integers(2, 12), seed=_seeds(), iters=st.integers(0, 12))
    def prop(batch: int, n: int, seed: int, iters: int) -> None:
        solver = make()
        f = tanh(batch, 2, n, 0.9, seed)
        z0 = torch.zeros_like(f.inj)
        torch.testing.assert_close(solver.unrolled(f, z0, iters=iters), solver.solve(f, z0, max_iter=iters, tol=0).z)

    prop()


def solve_never_toggles_grad_mode(make: Make) -> None:
    """solve evaluates f in the caller's grad mode: no graph under no_grad, a differentiable z otherwise."""
    w = torch.nn.Parameter(torch.eye(6, dtype=torch.float64) * 0.5)
    seen: list[bool] = []

    def f(z: Tensor) -> Tensor:
        seen.append(torch.is_grad_enabled())
        return z @ w + 1.0

    z0 = torch.zeros(2, 6, dtype=torch.float64)
    with torch.no_grad():
        out = make().solve(f, z0, max_iter=5, tol=0).z
    assert seen and not any(seen) and not out.requires_grad, "under no_grad, f must run without grad"
    seen.clear()
    out = make().solve(f, z0, max_iter=5, tol=0).z
    assert all(seen) and out.requires_grad, "with grad enabled, f must run with grad and z be differentiable"
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all(), "no finite gradient reached f's parameters"


def low_precision_map(make: Make) -> None:
    """A bf16 map: the iterate keeps bf16 and converges to bf16 accuracy."""
    f = linear(4, 8, 16, 0.7, 3, dtype=torch.bfloat16)
    result = make().solve(f, torch.zeros_like(f.b), max_iter=300, tol=2e-2)
    assert result.z.dtype == torch.bfloat16 and result.stats.converged.all(), (result.z.dtype, result.stats)
    err = (result.z.double() - linear(4, 8, 16, 0.7, 3).exact()).flatten(1).norm(dim=1)
    assert (err <= 0.1 * result.z.double().flatten(1).norm(dim=1)).all(), f"error {err.tolist()}"


BAD_ARGUMENTS: list[tuple[dict[str, object], str]] = [
    ({"max_iter": -1, "tol": 0.0}, "max_iter"),
    ({"max_iter": 2.5, "tol": 0.0}, "max_iter"),
    ({"max_iter": 3, "tol": -1e-3}, "tol"),
    ({"max_iter": 3, "tol": math.nan}, "tol"),
    ({"max_iter": 3, "tol": 1e-3, "check_every": 0}, "check_every"),
]


def bad_solve_arguments_are_usage_errors(make: Make) -> None:
    """Negative or fractional max_iter, negative or NaN tol, check_every < 1: UsageError naming the argument."""
    for kwargs, name in BAD_ARGUMENTS:
        try:
            make().solve(lambda z: z, torch.zeros(1, 3), **kwargs)
        except UsageError as exc:
            assert name in str(exc), f"{kwargs}: the error must name {name!r}: {exc}"
        else:
            raise AssertionError(f"solve(..., {kwargs}) must raise UsageError naming {name!r}")


def per_sample_caps_are_respected(make: Make) -> None:
    """An int64 (B,) max_iter caps each sample; with tol = 0 each row is the fixed-count solve of its own cap."""
    st = strategies()

    @given(
        batch=st.integers(1, 4),
        n=st.integers(2, 12),
        seed=_seeds(),
        limits=st.lists(st.integers(0, 12), min_size=4, max_size=4),
        tol=st.sampled_from([0.0, 1e-6]),
    )
    def prop(batch: int, n: int, seed: int, limits: list[int], tol: float) -> None:
        f = tanh(batch, 2, n, 0.9, seed)
        cap = torch.tensor(limits[:batch])
        result = make().solve(f, torch.zeros_like(f.inj), max_iter=cap, tol=tol)
        assert (result.stats.iterations <= cap).all(), (result.stats.iterations, cap)
        if tol == 0:
            assert torch.equal(result.stats.iterations, cap), (result.stats.iterations, cap)
            for row in range(batch):
                alone = make().solve(
                    f.restrict(torch.tensor([row])),
                    torch.zeros_like(f.inj[row : row + 1]),
                    max_iter=int(cap[row]),
                    tol=0,
                )
                torch.testing.assert_close(result.z[row : row + 1], alone.z)
        try:
            make().solve(f, torch.zeros_like(f.inj), max_iter=torch.ones(batch + 1, dtype=torch.long), tol=tol)
        except UsageError as exc:
            assert "per-sample max_iter" in str(exc), exc
        else:
            raise AssertionError("caps of the wrong length must raise UsageError ('per-sample max_iter ...')")

    prop()


CONTRACTS = (
    linear_contraction_reaches_tol_and_the_exact_fixed_point,
    tanh_contraction_reaches_tol_and_the_reference,
    start_at_the_fixed_point_costs_at_most_one_iteration,
    tol_zero_runs_exactly_max_iter,
    batch_rows_are_independent,
    check_every_k_keeps_per_sample_results,
    deterministic,
    result_shapes_dtypes_and_trace,
    diverging_or_nan_maps_stop_unconverged_with_a_finite_estimate,
    unrolled_form_equals_a_fixed_count_solve,
    solve_never_toggles_grad_mode,
    low_precision_map,
    bad_solve_arguments_are_usage_errors,
    per_sample_caps_are_respected,
)
