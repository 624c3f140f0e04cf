"""Built-in `fpdm` subcommands, registered through the same `register_commands` hook a plugin uses."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import attrs

from fpdm import hookimpl
from fpdm.build import build_solver
from fpdm.config import load_config, to_dict
from fpdm.errors import UsageError
from fpdm.solving.problems import LinearContraction, TanhContraction
from fpdm.registry import default_registry

from fpdm.apps.encode_cmd import encode_command
from fpdm.apps.eval_cmd import eval_command
from fpdm.apps.export_cmd import export_command
from fpdm.apps.import_cmd import import_official_command
from fpdm.apps.sample_cmd import sample_command
from fpdm.apps.train_cmd import train_command

Handler = Callable[[argparse.Namespace], int]


def plugins_command(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("--json", action="store_true", help="machine-readable output")

    def run(args: argparse.Namespace) -> int:
        infos = default_registry().plugins()
        if args.json:
            print(json.dumps([info.to_dict() for info in infos], indent=2))
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


PROBLEMS = {"linear": LinearContraction, "tanh": TanhContraction}
# The demo's own defaults sit under a config file and --set: a solve to 1e-3, not a training-style fixed count.
SOLVE_DEFAULTS = ("solver.tol=1e-3", "solver.max_iter=1000")


def solve_command(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("--config", help="TOML config; its [solver] table is used")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--solver", help="solver name (same as --set solver.name=NAME)")
    parser.add_argument("--all", action="store_true", help="run every registered solver with its default options")
    parser.add_argument("--problem", choices=sorted(PROBLEMS), default="linear")
    parser.add_argument("--rate", type=float, default=0.9, help="contraction rate, in [0, 1)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="machine-readable output")

    def run(args: argparse.Namespace) -> int:
        if not 0.0 <= args.rate < 1.0:
            raise UsageError(f"--rate must be in [0, 1), got {args.rate}")
        if min(args.batch, args.tokens, args.dim) < 1:
            raise UsageError("--batch, --tokens and --dim must be >= 1")
        overrides = [*args.set, *([f"solver.name={args.solver}"] if args.solver else [])]
        config = load_config(args.config, overrides, defaults=SOLVE_DEFAULTS).solver
        registry = default_registry()
        names = registry.names("solver") if args.all else [config.name]
        problem = PROBLEMS[args.problem].random(args.batch, args.tokens, args.dim, args.rate, seed=args.seed)
        reports = []
        for name in names:
            cfg = config if name == config.name else attrs.evolve(config, name=name, options={})
            reports.append(_solve_once(build_solver(cfg), cfg.name, problem, to_dict(cfg)))
        if args.json:
            print(json.dumps(reports, indent=2))
        else:
            print(f"{args.problem} contraction, rate {args.rate}, batch {args.batch} x {args.tokens} x {args.dim}, "
                  f"tol {config.tol}, max_iter {config.max_iter}")
            for r in reports:
                err = "" if r["error_vs_exact"] is None else f"  error vs exact {r['error_vs_exact']:.2e}"
                print(f"  {r['solver']:<14} iterations mean {r['iterations_mean']:.1f} max {r['iterations_max']:.0f}  "
                      f"residual max {r['residual_max']:.2e}  converged {r['converged_fraction']:.0%}  "
                      f"{r['seconds'] * 1e3:.1f} ms{err}")
        return 0

    return run


def _solve_once(solver: Any, name: str, problem: Any, config: dict[str, Any]) -> dict[str, Any]:
    z0 = problem.initial()
    start = time.perf_counter()
    result = solver.solve(problem, z0, max_iter=config["max_iter"], tol=config["tol"], check_every=config["check_every"])
    seconds = time.perf_counter() - start
    error = None
    if isinstance(problem, LinearContraction):
        exact = problem.solution()
        error = ((result.z - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)).max().item()
    return {"solver": name, "config": config, **result.stats.summary(), "seconds": seconds, "error_vs_exact": error}


@hookimpl
def register_commands(register):  # type: ignore[no-untyped-def]
    register("plugins", plugins_command, description="list plugins, where they came from and what they registered")
    register("solve", solve_command, description="run solvers on a synthetic contraction and print their stats")
    register("train", train_command, description="train an FPDM or DiT (S-JFB), with checkpoints and a loss log")
    register("export", export_command, description="export a denoising step (or the whole loop) to ONNX, solver unrolled")
    register("sample", sample_command, description="sample images under a block budget, with per-step stats")
    register("encode", encode_command, description="encode an image folder to SD-VAE latents (official feature format)")
    register("import-official", import_official_command, description="map an official FPDM/DiT checkpoint to an fpdm run")
    register("eval", eval_command, description="FID / KID / precision-recall (torch-fidelity) of samples vs a reference")
