"""Conformance suites for fpdm extensions: the contracts in `fpdm.interfaces`, as checks a plugin author runs.

One suite per extension kind (the registry's kind names): "solver", "schedule", "allocator", "reuse_policy",
"denoiser", "sampler", "exporter". fpdm's built-ins are tested with these same suites, over everything
registered.

In a pytest suite (one test per contract, so a failure names the contract and the implementation):

    import pytest
    from fpdm.testing import cases
    from my_plugin import MySolver

    @pytest.mark.parametrize("case", cases("solver", MySolver, m=3))   # options go to MySolver(m=3)
    def test_conformance(case):
        case()

`cases(kind, where, **options)` takes a factory (a class or any callable), a {label: factory} mapping, or a
`fpdm.Registry` (every name of that kind). Outside pytest, `check_solver(MySolver, m=3)` (and check_schedule,
check_allocator, check_reuse_policy, check_denoiser, check_sampler, check_exporter) runs every contract and
raises AssertionError on the first broken one; its first line reads
`solver contract 'tol_zero_runs_exactly_max_iter' broken by MySolver: <the promise>`.

What each factory builds: a solver, schedule, allocator or reuse policy with the given options; for
"denoiser" a SMALL model (e.g. `check_denoiser(MyNet, input_size=8, hidden_size=32)`) exposing in_channels,
input_size and num_classes, checked as a `FixedPointDenoiser` too when it is one (prepare/finish compose into
forward); for "sampler" an `fpdm.interfaces.Sampler`, run on Gaussian data whose exact denoiser and flow are
known (its order test passes lower_order_warmup=False and lower_order_final=False when the factory takes
them); for "exporter" an exporter, run on fpdm's own tiny FPDM and DiT. The contracts and their promises:
`[(c.__name__, fpdm.testing.promise(c)) for c in fpdm.testing.contracts("solver")]`.

Contracts that are properties run under hypothesis (a test dependency: `pip install 'fpdm[test]'`; imported
only when such a contract runs) with the active hypothesis profile's example count and no deadline. A
contract that needs something missing here (onnxruntime for the exporter) is skipped, not failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fpdm.testing import allocators, denoisers, exporters, reuse, samplers, schedules, solvers
from fpdm.testing.suite import Case, Contract, Skipped, implementations, promise, pytest_cases, run_all

SUITES: dict[str, tuple[Contract, ...]] = {
    "solver": solvers.CONTRACTS,
    "schedule": schedules.CONTRACTS,
    "allocator": allocators.CONTRACTS,
    "reuse_policy": reuse.CONTRACTS,
    "denoiser": denoisers.CONTRACTS,
    "sampler": samplers.CONTRACTS,
    "exporter": exporters.CONTRACTS,
}


def contracts(kind: str) -> tuple[Contract, ...]:
    """The contracts of one kind, in the order they run."""
    if kind not in SUITES:
        raise KeyError(f"no conformance suite for {kind!r}; suites: {', '.join(SUITES)}")
    return SUITES[kind]


def cases(kind: str, where: Any, **options: Any) -> list[Any]:
    """pytest params, one per (implementation, contract), for `@pytest.mark.parametrize("case", ...)`.

    `where`: a factory, a {label: factory} mapping, or a Registry (all names of `kind`); `options` go to every
    factory call. Test ids read LABEL-CONTRACT."""
    return pytest_cases(kind, contracts(kind), implementations(kind, where, options))


def check_solver(factory: Callable[..., Any], /, **options: Any) -> dict[str, str]:
    """Every solver contract against `factory(**options)`: {contract: 'passed' | 'skipped: why'}.
    AssertionError names the first broken contract."""
    return run_all("solver", solvers.CONTRACTS, factory, options)


def check_schedule(factory: Callable[..., Any], /, **options: Any) -> dict[str, str]:
    """Every schedule contract against `factory(**options)` (see `check_solver`)."""
    return run_all("schedule", schedules.CONTRACTS, factory, options)


def check_allocator(factory: Callable[..., Any], /, **options: Any) -> dict[str, str]:
    """Every budget allocator contract against `factory(**options)` (see `check_solver`)."""
    return run_all("allocator", allocators.CONTRACTS, factory, options)


def check_reuse_policy(factory: Callable[..., Any], /, **options: Any) -> dict[str, str]:
    """Every reuse policy contract against `factory(**options)` (see `check_solver`)."""
    return run_all("reuse_policy", reuse.CONTRACTS, factory, options)


def check_denoiser(factory: Callable[..., Any], /, **options: Any) -> dict[str, str]:
    """Every denoiser contract against `factory(**options)`, a small model (see `check_solver`)."""
    return run_all("denoiser", denoisers.CONTRACTS, factory, options)


def check_sampler(factory: Callable[..., Any], /, **options: Any) -> dict[str, str]:
    """Every sampler contract against `factory(**options)` (see `check_solver`)."""
    return run_all("sampler", samplers.CONTRACTS, factory, options)


def check_exporter(factory: Callable[..., Any], /, **options: Any) -> dict[str, str]:
    """Every exporter contract against `factory(**options)` (see `check_solver`); skipped without onnxruntime."""
    return run_all("exporter", exporters.CONTRACTS, factory, options)


__all__ = [
    "SUITES",
    "Case",
    "Skipped",
    "cases",
    "check_allocator",
    "check_denoiser",
    "check_exporter",
    "check_reuse_policy",
    "check_sampler",
    "check_schedule",
    "check_solver",
    "contracts",
    "promise",
]
