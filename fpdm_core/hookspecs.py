"""The whole plugin surface: one hook per kind, each `register_<kinds>(register)`.

A plugin module defines any of these with `@fpdm.hookimpl` and calls
`register(name, factory, *, description="")` once per thing it provides. Plugins are found through the
`fpdm` entry-point group, command plugins through `fpdm.cli` (see `register_commands`).
`factory(**options)` must return an instance of the kind's interface (a class deriving from it is checked
at registration). Hooks only register; they never run inside training or sampling loops. New hook
arguments will only ever be added, and a hook implementation may accept any subset of them, so plugins
written today keep working.
"""

from __future__ import annotations

from typing import Any, Protocol

import pluggy

hookspec = pluggy.HookspecMarker("fpdm")
hookimpl = pluggy.HookimplMarker("fpdm")


class Register(Protocol):
    def __call__(self, name: str, factory: Any, *, description: str = "") -> None: ...


@hookspec
def register_solvers(register: Register) -> None:
    """Register fixed-point solvers (factories of `fpdm.Solver`)."""


@hookspec
def register_denoisers(register: Register) -> None:
    """Register denoiser architectures (factories of `fpdm.Denoiser`)."""


@hookspec
def register_schedules(register: Register) -> None:
    """Register noise schedules (factories of `fpdm.Schedule`)."""


@hookspec
def register_reuse_policies(register: Register) -> None:
    """Register reuse policies for the fixed-point state across timesteps (factories of `fpdm.ReusePolicy`)."""


@hookspec
def register_budget_allocators(register: Register) -> None:
    """Register budget allocators (factories of `fpdm.BudgetAllocator`)."""


@hookspec
def register_samplers(register: Register) -> None:
    """Register samplers (factories of `fpdm.interfaces.Sampler`: `sampler(evaluate, x_T, diffusion, *, noise)`).

    An old-style step update, a callable `(diffusion, model_output, x, i, *, noise, clip_x0) -> x`, keeps
    working: the sampling loop runs it through `fpdm.diffusion.sampling.StepUpdateSampler`."""


@hookspec
def register_exporters(register: Register) -> None:
    """Register exporters (callables that write a deployable artifact)."""


@hookspec
def register_commands(register: Register) -> None:
    """Register `fpdm` subcommands: `factory(parser)` adds its arguments and returns `run(args) -> int`.

    Declare the module in the `fpdm.cli` entry-point group (`[project.entry-points."fpdm.cli"]`): the CLI
    loads that group alone to list commands, so the module and its factories import only argparse-level
    code, and `run` imports torch and the rest when called. The CLI calls a factory only when its command
    is parsed or asked for --help. (A module in the `fpdm` group may register commands too; they run, but
    are missing from `fpdm --help`.)"""
