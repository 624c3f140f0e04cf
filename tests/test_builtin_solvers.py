"""What the built-in solvers promise beyond the shared contract: Anderson's exportable small solve, its
relation to damped iteration, its speed-up on slow contractions, and export to ONNX of the unrolled forms."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fpdm.errors import UsageError
from fpdm.plugins.solvers import Anderson, FixedPointIteration, spd_solve
from fpdm.testing.maps import linear, tanh
from support import REGISTRY


@given(batch=st.integers(1, 4), h=st.integers(1, 8), seed=st.integers(0, 2**31 - 1), lam=st.floats(1e-6, 1.0))
def test_spd_solve_matches_torch_linalg_solve(batch, h, seed, lam):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(batch, h, 3 * h, generator=gen, dtype=torch.float64)
    system = g @ g.transpose(1, 2) / (3 * h) + lam * torch.eye(h, dtype=torch.float64)
    rhs = torch.randn(batch, h, generator=gen, dtype=torch.float64)
    expected = torch.linalg.solve(system, rhs.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(spd_solve(system, rhs), expected, rtol=1e-7, atol=1e-9)


@given(m=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 9))
def test_anderson_exportable_step_equals_eager_step(m, seed, steps):
    f = tanh(3, 2, 8, 0.9, seed)
    solver = Anderson(m=m)
    z = torch.zeros_like(f.inj)
    eager, export = solver.init_state(z), solver.init_state(z)
    for _ in range(steps):
        fz = f(z)
        z_eager, eager = solver.step(eager, z, fz)
        z_export, export = solver.step(export, z, fz, exportable=True)
        torch.testing.assert_close(z_export, z_eager, rtol=1e-8, atol=1e-10)
        z = z_eager


@given(beta=st.floats(0.05, 1.0), seed=st.integers(0, 2**31 - 1))
def test_anderson_with_window_one_is_damped_iteration(beta, seed):
    f = tanh(2, 2, 6, 0.8, seed)
    z0 = torch.zeros_like(f.inj)
    a = Anderson(m=1, beta=beta).solve(f, z0, max_iter=30, tol=0)
    p = FixedPointIteration(damping=1 - beta).solve(f, z0, max_iter=30, tol=0)
    torch.testing.assert_close(a.z, p.z, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@given(rate=st.floats(0.9, 0.99), seed=st.integers(0, 2**31 - 1), n=st.integers(16, 48))
def test_anderson_needs_fewer_iterations_than_plain_on_slow_contractions(rate, seed, n):
    f = linear(4, 2, n, rate, seed, symmetric=True)  # spectral radius = rate: plain needs ~log(tol)/log(rate)
    z0 = torch.zeros_like(f.b)
    plain = FixedPointIteration().solve(f, z0, max_iter=5000, tol=1e-4).stats
    anderson = Anderson().solve(f, z0, max_iter=5000, tol=1e-4).stats
    assert plain.converged.all() and anderson.converged.all()
    assert (anderson.iterations < plain.iterations).all()


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("anderson", {"m": 0}, "'m' must be >= 1"),
        ("anderson", {"m": 2.5}, "'m' must be <class 'int'>"),
        ("anderson", {"beta": 0.0}, "'beta' must be > 0"),
        ("anderson", {"lam": -1.0}, "'lam' must be > 0"),
        ("anderson", {"window": 3}, "has no option 'window'; options: m, beta, lam"),
        ("fixed_point", {"damping": 1.0}, "'damping' must be < 1"),
        ("fixed_point", {"damping": -0.1}, "'damping' must be >= 0"),
        ("fixed_point", {"m": 3}, "has no option 'm'; options: damping"),
    ],
)
def test_bad_options_name_the_problem(name, options, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        REGISTRY.create("solver", name, **options)


class _Unrolled(torch.nn.Module):
    """A tanh fixed-point layer solved by `solver.unrolled`: the shape export sees inside a denoiser."""

    def __init__(self, solver, iters: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.solver, self.iters = solver, iters
        self.w = torch.nn.Linear(8, 8)
        with torch.no_grad():
            self.w.weight.mul_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.solver.unrolled(lambda z: torch.tanh(self.w(z) + x), torch.zeros_like(x), iters=self.iters)


@pytest.mark.slow
@pytest.mark.parametrize("solver", [FixedPointIteration(), FixedPointIteration(damping=0.3), Anderson(m=3)], ids=repr)
def test_unrolled_solvers_export_to_onnx_and_match_in_onnxruntime(solver, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    module = _Unrolled(solver, iters=5).eval()
    path = tmp_path / "unrolled.onnx"
    program = torch.onnx.export(
        module,
        (torch.randn(3, 4, 8),),
        dynamo=True,
        input_names=["x"],
        output_names=["z"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    program.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert not {n.op_type for n in model.graph.node} & {"Inverse", "LinalgSolve", "Cholesky"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        xb = torch.randn(batch, 4, 8)
        (out,) = session.run(None, {"x": xb.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), module(xb), rtol=1e-4, atol=1e-5)
