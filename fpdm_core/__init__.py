"""fpdm: Fixed Point Diffusion Models (Bai & Melas-Kyriazi, CVPR 2024, arXiv 2401.08741).

    import fpdm
    pipe = fpdm.load("runs/demo")
    out = pipe.sample(n=16, steps=25, seed=0)

The core: interfaces, the plugin registry, the pipeline and the loops. Built-in plugins live in
`fpdm.plugins`, ONNX export in `fpdm.export`, the CLI in `fpdm.apps`.

This top level is lazy (PEP 562): the errors, `hookimpl` and `__version__` load with it; every other name
imports its module (and torch) on first access, so `import fpdm` and the CLI's start path stay fast. Core
modules never import this root: they import `fpdm.x.y` directly (and `__version__` from `fpdm.version`).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from fpdm.errors import FpdmError, FpdmRuntimeError, PluginError, UnknownNameError, UsageError
from fpdm.hookspecs import hookimpl
from fpdm.version import __version__

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from fpdm.config import Config, EvalConfig, ExportConfig, SampleConfig, load_config
    from fpdm.eval.evaluation import evaluate
    from fpdm.interfaces import (
        BudgetAllocator,
        Denoiser,
        DenoiserOutput,
        ReusePolicy,
        Schedule,
        Solver,
        SolverResult,
        SolverStats,
    )
    from fpdm.pipeline import Pipeline, SampleOutput, load
    from fpdm.planning import plan
    from fpdm.registry import Registry, default_registry
    from fpdm.solving.iterative import IterativeSolver, relative_residual
    from fpdm.training.loop import train

# public name -> the module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    **dict.fromkeys(("load", "Pipeline", "SampleOutput"), "fpdm.pipeline"),
    **dict.fromkeys(("Config", "SampleConfig", "ExportConfig", "EvalConfig", "load_config"), "fpdm.config"),
    "train": "fpdm.training.loop",
    "evaluate": "fpdm.eval.evaluation",
    "plan": "fpdm.planning",
    **dict.fromkeys(
        (
            "BudgetAllocator",
            "Denoiser",
            "DenoiserOutput",
            "ReusePolicy",
            "Schedule",
            "Solver",
            "SolverResult",
            "SolverStats",
        ),
        "fpdm.interfaces",
    ),
    **dict.fromkeys(("Registry", "default_registry"), "fpdm.registry"),
    **dict.fromkeys(("IterativeSolver", "relative_residual"), "fpdm.solving.iterative"),
}

__all__ = [
    "BudgetAllocator",
    "Config",
    "Denoiser",
    "DenoiserOutput",
    "EvalConfig",
    "ExportConfig",
    "FpdmError",
    "FpdmRuntimeError",
    "IterativeSolver",
    "Pipeline",
    "PluginError",
    "Registry",
    "ReusePolicy",
    "SampleConfig",
    "SampleOutput",
    "Schedule",
    "Solver",
    "SolverResult",
    "SolverStats",
    "UnknownNameError",
    "UsageError",
    "__version__",
    "default_registry",
    "evaluate",
    "hookimpl",
    "load",
    "load_config",
    "plan",
    "relative_residual",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"fpdm.{name}") is not None:
            return importlib.import_module(f"fpdm.{name}")  # `import fpdm; fpdm.config...` as before
        raise AttributeError(f"module 'fpdm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
