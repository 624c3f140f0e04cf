"""The one conformance suite every registered solver passes (built-ins and plugins alike).

Properties with known answers: the closed-form fixed point of linear contractions, a converged reference
for tanh contractions, and the contraction bound ||z - z*|| <= L / (1 - L) * ||f(z_k) - z_k||.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import REGISTRY, SOLVER_NAMES
from fpdm.errors import UsageError
from fpdm.interfaces import Solver, SolverResult
from maps import Plain, linear, tanh

pytestmark = pytest.mark.parametrize("name", SOLVER_NAMES)

seeds = st.integers(0, 2**31 - 1)
batches = st.integers(1, 4)
dims = st.integers(2, 12)
tokens = st.integers(1, 3)


def make(name: str) -> Solver:
    return REGISTRY.create("solver", name)


def contraction_bound(z: torch.Tensor, truth: torch.Tensor, rate: float, tol: float) -> None:
    """Returned z = f(z_k) with ||f(z_k) - z_k|| <= tol ||f(z_k)||, so ||z - z*|| <= L/(1-L) tol ||z||."""
    err = (z - truth).flatten(1).norm(dim=1)
    bound = rate / (1 - rate) * tol * z.flatten(1).norm(dim=1) * 1.01 + 1e-10
    assert torch.all(err <= bound), (err, bound)


@given(batch=batches, t=tokens, n=dims, rate=st.floats(0.0, 0.95), seed=seeds, tol=st.sampled_from([1e-3, 1e-6]))
def test_linear_contraction_reaches_tol_and_the_exact_fixed_point(name, batch, t, n, rate, seed, tol):
    f = linear(batch, t, n, rate, seed)
    result = make(name).solve(f, torch.zeros_like(f.b), max_iter=2000, tol=tol)
    assert isinstance(result, SolverResult)
    assert result.stats.converged.all() and (result.stats.residual <= tol).all()
    contraction_bound(result.z, f.exact(), rate, tol)


@given(batch=batches, t=tokens, n=dims, rate=st.floats(0.0, 0.95), seed=seeds)
def test_tanh_contraction_reaches_tol_and_the_reference(name, batch, t, n, rate, seed):
    f, tol = tanh(batch, t, n, rate, seed), 1e-6
    result = make(name).solve(f, torch.zeros_like(f.inj), max_iter=2000, tol=tol)
    assert result.stats.converged.all()
    contraction_bound(result.z, f.reference(), rate, tol)
    # Independent check of the reported criterion: the residual of the returned z itself is <= L * tol.
    own = (f(result.z) - result.z).flatten(1).norm(dim=1) / result.z.flatten(1).norm(dim=1)
    assert torch.all(own <= max(rate, 1e-3) * tol * 1.01 + 1e-12)


@given(batch=batches, n=dims, rate=st.floats(0.0, 0.95), seed=seeds)
def test_start_at_the_fixed_point_costs_at_most_one_iteration(name, batch, n, rate, seed):
    f = linear(batch, 2, n, rate, seed)
    result = make(name).solve(f, f.exact(), max_iter=50, tol=1e-8)
    assert (result.stats.iterations <= 1).all() and result.stats.converged.all()


@given(batch=batches, n=dims, seed=seeds, max_iter=st.integers(0, 15))
def test_tol_zero_runs_exactly_max_iter(name, batch, n, seed, max_iter):
    f = linear(batch, 2, n, 0.5, seed)
    result = make(name).solve(f, torch.zeros_like(f.b), max_iter=max_iter, tol=0.0)
    assert result.stats.iterations.tolist() == [max_iter] * batch
    if max_iter == 0:
        assert torch.equal(result.z, torch.zeros_like(f.b))


@given(batch=st.integers(2, 5), n=dims, seed=seeds, restrictable=st.booleans())
def test_batch_rows_are_independent(name, batch, n, seed, restrictable):
    # Rows with very different rates in one batch: each must come out as if solved alone.
    rows = [linear(1, 2, n, rate, seed + i) for i, rate in enumerate(torch.linspace(0.1, 0.95, batch).tolist())]
    b = torch.cat([r.b for r in rows])
    solver = make(name)
    together = solver.solve(_rowwise(rows, restrictable), torch.zeros_like(b), max_iter=2000, tol=1e-6)
    alone = [solver.solve(r, torch.zeros_like(r.b), max_iter=2000, tol=1e-6) for r in rows]
    assert together.stats.iterations.tolist() == [a.stats.iterations.item() for a in alone]
    torch.testing.assert_close(together.z, torch.cat([a.z for a in alone]), rtol=1e-9, atol=1e-12)


class _RowwiseLinear:
    """A batch whose rows each have their own matrix (a mixed batch of easy and hard problems)."""

    def __init__(self, rows, index=None):  # type: ignore[no-untyped-def]
        self.rows = rows
        self.index = list(range(len(rows))) if index is None else index

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.rows[i](z[j : j + 1]) for j, i in enumerate(self.index)])

    def restrict(self, rows: torch.Tensor) -> "_RowwiseLinear":
        return _RowwiseLinear(self.rows, [self.index[r] for r in rows.tolist()])


def _rowwise(rows, restrictable):  # type: ignore[no-untyped-def]
    f = _RowwiseLinear(rows)
    return f if restrictable else Plain(f)


@given(n=dims, seed=seeds, check_every=st.integers(2, 7), restrictable=st.booleans())
def test_check_every_k_keeps_per_sample_results(name, n, seed, check_every, restrictable):
    rows = [linear(1, 2, n, rate, seed + i) for i, rate in enumerate([0.2, 0.6, 0.9])]
    z0 = torch.zeros(3, 2, n, dtype=torch.float64)
    solver = make(name)
    every = solver.solve(_rowwise(rows, True), z0, max_iter=2000, tol=1e-6)
    sparse = solver.solve(_rowwise(rows, restrictable), z0, max_iter=2000, tol=1e-6, check_every=check_every)
    assert sparse.stats.iterations.tolist() == every.stats.iterations.tolist()
    torch.testing.assert_close(sparse.z, every.z, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sparse.stats.residual, every.stats.residual)


@given(batch=batches, n=dims, rate=st.floats(0.0, 0.95), seed=seeds)
def test_deterministic(name, batch, n, rate, seed):
    f = tanh(batch, 2, n, rate, seed)
    a = make(name).solve(f, torch.zeros_like(f.inj), max_iter=500, tol=1e-5, trace=True)
    b = make(name).solve(f, torch.zeros_like(f.inj), max_iter=500, tol=1e-5, trace=True)
    assert torch.equal(a.z, b.z) and torch.equal(a.stats.iterations, b.stats.iterations)
    assert torch.equal(a.stats.trace.nan_to_num(-1), b.stats.trace.nan_to_num(-1))


def test_result_shapes_dtypes_and_trace(name):
    f = tanh(3, 4, 8, 0.8, 1)
    z0 = torch.zeros_like(f.inj)
    result = make(name).solve(f, z0, max_iter=40, tol=1e-6, trace=True)
    stats = result.stats
    assert result.z.shape == z0.shape and result.z.dtype == z0.dtype
    assert stats.iterations.dtype == torch.int64 and stats.iterations.shape == (3,)
    assert stats.residual.dtype == torch.float32 and stats.converged.dtype == torch.bool
    assert stats.trace.shape == (3, 40)
    for row, its in enumerate(stats.iterations.tolist()):
        assert torch.isfinite(stats.trace[row, :its]).all() and torch.isnan(stats.trace[row, its:]).all()
        assert stats.trace[row, its - 1] == stats.residual[row]  # the converged step is the reported one
    assert set(stats.summary()) == {"iterations_mean", "iterations_max", "residual_mean", "residual_max", "converged_fraction"}


@pytest.mark.parametrize("kind", ["no_fixed_point", "overflow", "nan_after_1", "inf_rows"])
def test_diverging_or_nan_maps_stop_unconverged_with_a_finite_estimate(name, kind):
    z0 = torch.ones(4, 2, 6, dtype=torch.float32)
    calls = []

    def f(z: torch.Tensor) -> torch.Tensor:
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

    for tol in (1e-4, 0.0):
        calls.clear()
        result = make(name).solve(f, z0, max_iter=300, tol=tol)
        assert torch.isfinite(result.z).all()
        assert len(calls) <= 300
        if kind == "inf_rows":
            assert not result.stats.converged[::2].any()
            assert result.stats.converged[1::2].all() or not tol
            assert torch.equal(result.z[::2], z0[::2])  # never saw a finite image: keeps z0
        else:
            assert not result.stats.converged.any()
            assert not (result.stats.residual <= 0.5).any()


@given(batch=batches, n=dims, seed=seeds, iters=st.integers(0, 12))
def test_unrolled_form_equals_a_fixed_count_solve(name, batch, n, seed, iters):
    solver = make(name)
    if not solver.can_unroll:
        with pytest.raises(UsageError, match="unrolled"):
            solver.unrolled(lambda z: z, torch.zeros(1, 1))
        return
    f = tanh(batch, 2, n, 0.9, seed)
    z0 = torch.zeros_like(f.inj)
    torch.testing.assert_close(solver.unrolled(f, z0, iters=iters), solver.solve(f, z0, max_iter=iters, tol=0).z)


def test_solve_never_toggles_grad_mode(name):
    w = torch.nn.Parameter(torch.eye(6, dtype=torch.float64) * 0.5)
    seen = []

    def f(z: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        return z @ w + 1.0

    z0 = torch.zeros(2, 6, dtype=torch.float64)
    with torch.no_grad():
        out = make(name).solve(f, z0, max_iter=5, tol=0).z
    assert seen and not any(seen) and not out.requires_grad
    seen.clear()
    out = make(name).solve(f, z0, max_iter=5, tol=0).z
    assert all(seen) and out.requires_grad
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_low_precision_map(name):
    # f runs in bf16; the solver keeps the iterate's dtype and still converges to bf16 accuracy.
    f = linear(4, 8, 16, 0.7, 3, dtype=torch.bfloat16)
    result = make(name).solve(f, torch.zeros_like(f.b), max_iter=300, tol=2e-2)
    assert result.z.dtype == torch.bfloat16 and result.stats.converged.all()
    err = (result.z.double() - linear(4, 8, 16, 0.7, 3).exact()).flatten(1).norm(dim=1)
    assert (err <= 0.1 * result.z.double().flatten(1).norm(dim=1)).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_iter": -1, "tol": 0.0}, "max_iter"),
        ({"max_iter": 2.5, "tol": 0.0}, "max_iter"),
        ({"max_iter": 3, "tol": -1e-3}, "tol"),
        ({"max_iter": 3, "tol": math.nan}, "tol"),
        ({"max_iter": 3, "tol": 1e-3, "check_every": 0}, "check_every"),
    ],
)
def test_bad_solve_arguments_are_usage_errors(name, kwargs, message):
    with pytest.raises(UsageError, match=message):
        make(name).solve(lambda z: z, torch.zeros(1, 3), **kwargs)


@given(batch=batches, n=dims, seed=seeds, limits=st.lists(st.integers(0, 12), min_size=4, max_size=4),
       tol=st.sampled_from([0.0, 1e-6]))
def test_per_sample_caps_are_respected(name, batch, n, seed, limits, tol):
    f = tanh(batch, 2, n, 0.9, seed)
    cap = torch.tensor(limits[:batch])
    result = make(name).solve(f, torch.zeros_like(f.inj), max_iter=cap, tol=tol)
    assert (result.stats.iterations <= cap).all()
    if tol == 0:
        assert torch.equal(result.stats.iterations, cap)
        for row in range(batch):  # each row equals a fixed-count solve of its own length
            alone = make(name).solve(f.restrict(torch.tensor([row])), torch.zeros_like(f.inj[row : row + 1]),
                                     max_iter=int(cap[row]), tol=0)
            torch.testing.assert_close(result.z[row : row + 1], alone.z)
    with pytest.raises(UsageError, match="per-sample max_iter"):
        make(name).solve(f, torch.zeros_like(f.inj), max_iter=torch.ones(batch + 1, dtype=torch.long), tol=tol)
