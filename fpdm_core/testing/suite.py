"""The machinery every conformance suite shares: contracts, the runner, pytest cases, hypothesis set-up.

A contract is a plain function `contract(make) -> None` whose docstring's first paragraph states the promise;
`make(**options)` builds a fresh instance of the implementation under test. A broken contract raises
AssertionError, which the runner rewraps so its first line names the kind, the contract and the
implementation. A contract that cannot run here (an optional dependency is missing) raises `Skipped`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fpdm.registry import Registry

Make = Callable[..., Any]
Contract = Callable[[Make], None]


class Skipped(Exception):
    """A contract that cannot run in this environment (e.g. onnxruntime is not installed); the message says why."""


def skip(reason: str) -> None:
    raise Skipped(reason)


def promise(contract: Contract) -> str:
    """The docstring's first paragraph on one line: what the contract promises."""
    text = (contract.__doc__ or contract.__name__).strip().split("\n\n")[0]
    return " ".join(line.strip() for line in text.splitlines())


@dataclasses.dataclass(frozen=True)
class Case:
    """One contract against one implementation; calling it runs the check (pytest skips a `Skipped` one)."""

    kind: str
    label: str
    contract: Contract
    make: Make

    @property
    def id(self) -> str:
        return f"{self.label}-{self.contract.__name__}"

    def run(self) -> None:
        """Run the contract; AssertionError on a broken promise, `Skipped` when it cannot run here."""
        try:
            self.contract(self.make)
        except AssertionError as exc:
            raise AssertionError(
                f"{self.kind} contract {self.contract.__name__!r} broken by {self.label}: "
                f"{promise(self.contract)}\n{exc}"
            ) from exc

    def __call__(self) -> None:
        try:
            self.run()
        except Skipped as exc:
            import pytest

            pytest.skip(str(exc))


def maker(factory: Callable[..., Any], options: Mapping[str, Any]) -> Make:
    """make(**extra) -> factory(**options, **extra): every call builds a fresh instance."""

    def make(**extra: Any) -> Any:
        return factory(**{**options, **extra})

    return make


def label_of(factory: Callable[..., Any]) -> str:
    inner = factory.func if isinstance(factory, functools.partial) else factory
    return getattr(inner, "__qualname__", None) or type(inner).__name__


def implementations(
    kind: str, where: Callable[..., Any] | Mapping[str, Callable[..., Any]] | Registry, options: Mapping[str, Any]
) -> dict[str, Make]:
    """label -> make for one factory, a {label: factory} mapping, or every `kind` name of a registry."""
    if hasattr(where, "names") and hasattr(where, "create"):
        registry = where
        return {name: maker(functools.partial(registry.create, kind, name), options) for name in registry.names(kind)}
    if isinstance(where, Mapping):
        return {label: maker(factory, options) for label, factory in where.items()}
    if callable(where):
        return {label_of(where): maker(where, options)}
    raise TypeError(f"expected a factory, a {{label: factory}} mapping or a Registry, got {type(where).__name__}")


def run_all(
    kind: str, contracts: Iterable[Contract], factory: Callable[..., Any], options: Mapping[str, Any]
) -> dict[str, str]:
    """Every contract against one factory: {contract: 'passed' | 'skipped: why'}; raises on the first broken one."""
    outcome = {}
    make, label = maker(factory, options), label_of(factory)
    for contract in contracts:
        try:
            Case(kind, label, contract, make).run()
        except Skipped as exc:
            outcome[contract.__name__] = f"skipped: {exc}"
        else:
            outcome[contract.__name__] = "passed"
    return outcome


def pytest_cases(kind: str, contracts: Iterable[Contract], makes: Mapping[str, Make]) -> list[Any]:
    """pytest.param(Case, id='LABEL-CONTRACT') for every implementation and contract."""
    import pytest

    return [
        pytest.param(case, id=case.id)
        for label, make in makes.items()
        for case in (Case(kind, label, c, make) for c in contracts)
    ]


# ---------------------------------------------------------------------------------------------- hypothesis


def hypothesis() -> Any:
    """hypothesis, imported when a property contract runs: it is a test dependency, not a runtime one."""
    try:
        import hypothesis as hyp
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise ImportError("fpdm.testing's property contracts need hypothesis: pip install 'fpdm[test]'") from exc
    return hyp


def given(**strategies: Any) -> Callable[[Callable[..., None]], Callable[[], None]]:
    """hypothesis.given with the active profile's example count and no deadline: solves take what they take,
    and a deadline would turn a slow machine into a failure."""
    hyp = hypothesis()

    def wrap(fn: Callable[..., None]) -> Callable[[], None]:
        checks = [hyp.HealthCheck.too_slow, hyp.HealthCheck.data_too_large]
        return hyp.settings(deadline=None, suppress_health_check=checks)(hyp.given(**strategies)(fn))

    return wrap


def strategies() -> Any:
    return hypothesis().strategies
