"""Built-in `fpdm` subcommands, registered through the same `register_commands` hook a plugin uses.

This module sits in the `fpdm.cli` entry-point group, which the CLI loads on its start path, so it imports
only argparse-level code. Each command's module is imported when that command's parser is built (the
factories below), and each command imports torch only inside its `run`.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from typing import Any

from fpdm.apps.cli import Handler, add_json_option, deprecated_alias, write_json
from fpdm.hookspecs import Register, hookimpl


def plugins_command(parser: argparse.ArgumentParser) -> Handler:
    add_json_option(parser)

    def run(args: argparse.Namespace) -> int:
        from fpdm.registry import default_registry

        infos = default_registry().plugins()
        if args.json is not None:
            write_json([info.to_dict() for info in infos], args.json)
            if args.json == "-":
                return 0
        rows = [("PLUGIN", "SOURCE", "STATUS", "REGISTERED")]
        for info in infos:
            provided = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in info.registered.items())
            rows.append((info.name, info.source, "error" if info.error else "ok", info.error or provided or "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
        return 0

    return run


PROBLEMS = ("linear", "tanh")
# The demo's own defaults sit under a config file and --set: a solve to 1e-3, not a training-style fixed count.
SOLVE_DEFAULTS = ("solver.tol=1e-3", "solver.max_iter=1000")


def solve_command(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("--config", help="TOML config; its [solver] table is used")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--solver", help="solver name (same as --set solver.name=NAME; default: the config's)")
    parser.add_argument("--all", action="store_true", help="run every registered solver with its default options")
    parser.add_argument("--problem", choices=PROBLEMS, default="linear", help="the synthetic map z -> f(z)")
    parser.add_argument("--rate", type=float, default=0.9, help="contraction rate, in [0, 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="problems solved at once")
    deprecated_alias(parser, "--batch", dest="batch_size", new="--batch-size", type=int)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per problem")
    parser.add_argument("--dim", type=int, default=128, help="width of each token")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random problem")
    add_json_option(parser)

    def run(args: argparse.Namespace) -> int:
        from fpdm.errors import UsageError

        if not 0.0 <= args.rate < 1.0:
            raise UsageError(f"--rate must be in [0, 1), got {args.rate}")
        if min(args.batch_size, args.tokens, args.dim) < 1:
            raise UsageError("--batch-size, --tokens and --dim must be >= 1")
        config, reports = _solve_all(args)
        if args.json is not None:
            write_json(reports, args.json)
            if args.json == "-":
                return 0
        print(
            f"{args.problem} contraction, rate {args.rate}, batch {args.batch_size} x {args.tokens} x {args.dim}, "
            f"tol {config.tol}, max_iter {config.max_iter}"
        )
        for r in reports:
            err = "" if r["error_vs_exact"] is None else f"  error vs exact {r['error_vs_exact']:.2e}"
            print(
                f"  {r['solver']:<14} iterations mean {r['iterations_mean']:.1f} max {r['iterations_max']:.0f}  "
                f"residual max {r['residual_max']:.2e}  converged {r['converged_fraction']:.0%}  "
                f"{r['seconds'] * 1e3:.1f} ms{err}"
            )
        return 0

    return run


def _solve_all(args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]]]:
    """The configured solver (or every registered one) on one random problem: (solver config, reports)."""
    import attrs

    from fpdm.build import build_solver
    from fpdm.config import load_config, to_dict
    from fpdm.registry import default_registry
    from fpdm.solving.problems import LinearContraction, TanhContraction

    overrides = [*args.set, *([f"solver.name={args.solver}"] if args.solver else [])]
    config = load_config(args.config, overrides, defaults=SOLVE_DEFAULTS).solver
    names = default_registry().names("solver") if args.all else [config.name]
    problem = (LinearContraction if args.problem == "linear" else TanhContraction).random(
        args.batch_size, args.tokens, args.dim, args.rate, seed=args.seed
    )
    reports = []
    for name in names:
        cfg = config if name == config.name else attrs.evolve(config, name=name, options={})
        reports.append(_solve_once(build_solver(cfg), cfg.name, problem, to_dict(cfg)))
    return config, reports


def _solve_once(solver: Any, name: str, problem: Any, config: dict[str, Any]) -> dict[str, Any]:
    from fpdm.solving.problems import LinearContraction

    z0 = problem.initial()
    start = time.perf_counter()
    result = solver.solve(
        problem, z0, max_iter=config["max_iter"], tol=config["tol"], check_every=config["check_every"]
    )
    seconds = time.perf_counter() - start
    error = None
    if isinstance(problem, LinearContraction):
        exact = problem.solution()
        error = ((result.z - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)).max().item()
    return {"solver": name, "config": config, **result.stats.summary(), "seconds": seconds, "error_vs_exact": error}


# The other commands' modules load only when their command is parsed or asked for --help.
def _lazy(module: str, factory: str) -> Callable[[argparse.ArgumentParser], Handler]:
    """The command factory `fpdm.apps.MODULE.FACTORY`, imported the first time the command's parser is built."""

    def build(parser: argparse.ArgumentParser) -> Handler:
        built: Handler = getattr(importlib.import_module(f"fpdm.apps.{module}"), factory)(parser)
        return built

    return build


# name -> (module under fpdm.apps, its factory, description); each module loads when its command is parsed.
LAZY_COMMANDS = {
    "train": ("train_cmd", "train_command", "train an FPDM or DiT (S-JFB), with checkpoints and a loss log"),
    "export": ("export_cmd", "export_command", "export a denoising step (or the whole loop) to ONNX, solver unrolled"),
    "sample": ("sample_cmd", "sample_command", "sample images under a block budget, with per-step stats"),
    "plan": ("plan_cmd", "plan_command", "measure the best sampling settings for each budget and store them"),
    "pack": ("pack_cmd", "pack_command", "pack a run into a shareable model folder (weights, config.toml, model card)"),
    "encode": ("encode_cmd", "encode_command", "encode an image folder to SD-VAE latents (official feature format)"),
    "import-official": ("import_cmd", "import_official_command", "map an official FPDM/DiT checkpoint to an fpdm run"),
    "eval": ("eval_cmd", "eval_command", "FID / KID / precision-recall (torch-fidelity) of samples vs a reference"),
}


@hookimpl
def register_commands(register: Register) -> None:
    register("plugins", plugins_command, description="list plugins, where they came from and what they registered")
    register("solve", solve_command, description="run solvers on a synthetic contraction and print their stats")
    for name, (module, factory, description) in LAZY_COMMANDS.items():
        register(name, _lazy(module, factory), description=description)
