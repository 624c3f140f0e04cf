"""The plugin's own tests, written the way any third-party fpdm plugin tests itself: fpdm.testing's solver
suite (one test per contract) on the solver class and on the name the plugin registers, plus the plugin's
own promises."""

from __future__ import annotations

import pytest
import torch

import fpdm_plugin_example
from fpdm.registry import Registry
from fpdm.testing import cases
from fpdm_plugin_example import BarzilaiBorwein


@pytest.mark.parametrize("case", cases("solver", BarzilaiBorwein))
def test_solver_contract(case):
    case()


@pytest.mark.parametrize("case", cases("solver", {"small-steps": BarzilaiBorwein}, max_step=2.0))
def test_solver_contract_with_options(case):
    case()


def test_registers_under_its_name():
    registry = Registry()  # an empty registry: only this plugin
    info = registry.add_plugin(fpdm_plugin_example, name="barzilai_borwein", source="tests")
    assert info.error is None and info.registered == {"solver": ("barzilai_borwein",)}
    solver = registry.create("solver", "barzilai_borwein", max_step=10)
    assert isinstance(solver, BarzilaiBorwein) and solver.max_step == 10.0


def test_solves_a_linear_problem_plain_iteration_finds_slow():
    # z = A z + b with A = 0.99 I: plain iteration needs ~1400 steps for 1e-6, a secant step needs two.
    b = torch.randn(3, 5, dtype=torch.float64)
    result = BarzilaiBorwein().solve(lambda z: 0.99 * z + b, torch.zeros_like(b), max_iter=50, tol=1e-6)
    assert result.stats.converged.all() and (result.stats.iterations <= 5).all()
    torch.testing.assert_close(result.z, 100 * b)
