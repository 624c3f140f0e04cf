"""fpdm: Fixed Point Diffusion Models (Bai & Melas-Kyriazi, CVPR 2024, arXiv 2401.08741).

The core: interfaces, the plugin registry and the shared solve loop. Built-in plugins live in
`fpdm.plugins`, ONNX export in `fpdm.export`, the CLI in `fpdm.apps`.
"""

from importlib import metadata as _metadata

from fpdm.errors import FpdmError, FpdmRuntimeError, PluginError, UnknownNameError, UsageError
from fpdm.hookspecs import hookimpl
from fpdm.interfaces import BudgetAllocator, Denoiser, DenoiserOutput, ReusePolicy, Schedule, Solver, SolverResult, SolverStats
from fpdm.registry import Registry, default_registry
from fpdm.solving.iterative import IterativeSolver, relative_residual

try:
    __version__ = _metadata.version("fpdm")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BudgetAllocator",
    "Denoiser",
    "DenoiserOutput",
    "FpdmError",
    "FpdmRuntimeError",
    "IterativeSolver",
    "PluginError",
    "Registry",
    "ReusePolicy",
    "Schedule",
    "Solver",
    "SolverResult",
    "SolverStats",
    "UnknownNameError",
    "UsageError",
    "__version__",
    "default_registry",
    "hookimpl",
    "relative_residual",
]
