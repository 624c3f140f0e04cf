"""Names become objects here and nowhere else: config -> parts."""

from __future__ import annotations

from .config import SolverConfig
from .interfaces import Solver
from .registry import Registry, default_registry


def build_solver(config: SolverConfig, registry: Registry | None = None) -> Solver:
    """The solver named by `config.name`, built with `config.options` (validated by the solver)."""
    registry = registry or default_registry()
    return registry.create("solver", config.name, **config.options)
