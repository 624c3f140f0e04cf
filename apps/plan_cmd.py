"""`fpdm plan MODEL --budget B [--budget B2 ...] [--out FILE]`: flags -> `Grid` + `PlanConfig` ->
`fpdm.planning.plan`, which searches the grid under each budget and stores the best settings, then a summary.
`fpdm sample MODEL --budget B` uses them. Top-level imports stay torch-free (`fpdm plan --help` must not load torch).
"""

from __future__ import annotations

import argparse
from typing import Any

from fpdm.apps.cli import (
    Handler,
    add_device_option,
    add_json_option,
    add_model_argument,
    add_weights_option,
    write_json,
)
from fpdm.apps.sampling_setup import budget_text


def plan_command(parser: argparse.ArgumentParser) -> Handler:
    add_model_argument(parser)
    parser.add_argument(
        "--budget",
        action="append",
        type=budget_text,
        required=True,
        metavar="B",
        help="a budget to plan, repeatable: block evaluations per sample (60) or DiT-step equivalents (10dit)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="the plan file (default: RUN/plan.toml, or the [plan] table of a packed folder's config.toml); "
        "sample with it through fpdm sample --plan FILE",
    )
    grid = parser.add_argument_group("the grid (each flag repeatable; default: the default grid, docs/sampling.md)")
    grid.add_argument(
        "--sampler",
        action="append",
        metavar="NAME",
        help="samplers (default: dpmpp_2m, dpmpp_3m, unipc, euler, heun, ddim, those registered)",
    )
    grid.add_argument("--spacing", action="append", metavar="NAME", help="spacings (default: official, trailing)")
    grid.add_argument(
        "--iters",
        action="append",
        type=int,
        metavar="K",
        help="fixed-point iterations per evaluation; each picks the most steps that pay it (default: 1, 2, 4)",
    )
    grid.add_argument(
        "--steps",
        action="append",
        type=int,
        metavar="S",
        help="explicit step counts instead of --iters (default: none)",
    )
    grid.add_argument("--allocator", action="append", metavar="NAME", help="allocators (default: uniform, increasing)")
    grid.add_argument("--solver", action="append", metavar="NAME", help="fixed-point solvers (default: fixed_point)")
    grid.add_argument("--reuse", default="reuse", metavar="NAME", help="the reuse policy of every cell")
    search = parser.add_argument_group("the search")
    search.add_argument(
        "--samples", type=int, default=130, metavar="N", help="images per cell at the first rung (more than 128)"
    )
    search.add_argument("--rungs", type=int, default=3, metavar="R", help="rungs of successive halving")
    search.add_argument("--reduction", type=int, default=3, metavar="F", help="each rung keeps the best 1/F")
    search.add_argument("--seed", type=int, default=0, metavar="N", help="rung r draws its new images from seed N + r")
    search.add_argument("--batch-size", type=int, default=260, metavar="N", help="images sampled at once")
    search.add_argument(
        "--ref", metavar="NAME|DIR", help="reference images (default: the model's training data, train split)"
    )
    search.add_argument("--ref-n", type=int, metavar="N", help="a seeded random subset of this many reference images")
    search.add_argument("--data-dir", metavar="DIR", help="Fashion-MNIST IDX folder (default: the run's)")
    add_weights_option(search)
    add_device_option(search)
    add_json_option(parser, help="also write the plan's entries as JSON to PATH; '-': stdout, instead of the summary")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        from fpdm.apps.presets import default_run
        from fpdm.planning import plan

        config = _config(args)  # cheap checks before anything is loaded
        result = plan(default_run(args.model), args.budget, config, out=args.out, progress=not args.no_progress)
        if args.json is not None:
            write_json({"path": str(result.path), "seconds": result.seconds, "budgets": result.entries}, args.json)
        if args.json != "-":
            print("\n".join(result.lines()))
        return 0

    return run


def _config(args: argparse.Namespace) -> Any:
    """The `PlanConfig` of the flags; a flag not given keeps the default grid's axis."""
    from fpdm.config import make_config
    from fpdm.diffusion.planner import Grid
    from fpdm.planning import PlanConfig

    axes = {
        "samplers": args.sampler,
        "spacings": args.spacing,
        "iters": args.iters,
        "steps": args.steps,
        "allocators": args.allocator,
        "solvers": args.solver,
    }
    grid = make_config(Grid, reuse=args.reuse, **{k: value for k, value in axes.items() if value is not None})
    return make_config(
        PlanConfig,
        grid=grid,
        samples=args.samples,
        rungs=args.rungs,
        reduction=args.reduction,
        seed=args.seed,
        batch_size=args.batch_size,
        ref=args.ref,
        ref_n=args.ref_n,
        data_dir=args.data_dir,
        device=args.device,
        weights=args.weights,
    )
