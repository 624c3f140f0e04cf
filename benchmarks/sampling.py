"""Sampling benchmark on a trained Fashion-MNIST FPDM: residual and speed per solver x allocator x reuse.

    python benchmarks/sampling.py [--checkpoint runs/demo] [--n 64] [--quick] [--allocation] [--update-docs]

Budgets are 2, 5, 10 and 20 DiT-step equivalents: a DiT of the same width spends its depth (6 blocks for
XS) per step, so the FPDM gets 12, 30, 60 and 120 block evaluations per sample, spent as budget // 6 steps
(about four iterations each on average). For every solver x allocator x reuse combination the run records
the mean final relative residual of the fixed-point solves and images/s. It also times fpdm's sampler
against a hand-written loop of the same model calls (the framework overhead), and on CUDA one FPDM-XL/2
denoising step at batch 64 with 26 iterations in bf16 (eager and torch.compile).
Writes benchmarks/results/sampling.json and sampling.md.

--allocation compares the allocators alone (uniform, the paper's increasing ramp, adaptive at three
tolerances) by residual and blocks spent, with no timing, so it can run on a loaded machine; it writes
sampling_allocation.json / .md and the docs/benchmarks.md table `bench:sampling-allocation`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import torch

from _report import RESULTS, ROOT, publish
from fpdm.build import build_schedule, load_denoiser
from fpdm.config import Config, from_dict
from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.diffusion.sampling import generate, plan_iterations, plan_tolerances
from fpdm.io.checkpoint import load_checkpoint
from fpdm.plugins.samplers import DDIM
from fpdm.registry import Registry

DIT_DEPTH = 6  # DiT-XS, the equal-width baseline
BLOCKS_PER_STEP = 6  # pre + post + ~4 iterations
# --allocation: (label, allocator, options); adaptive's default tol and a looser and a tighter one
ALLOCATION = [
    ("uniform", "uniform", {}),
    ("increasing", "increasing", {}),
    ("adaptive", "adaptive", {}),
    ("adaptive tol=0.1", "adaptive", {"tol": 0.1}),
    ("adaptive tol=0.4", "adaptive", {"tol": 0.4}),
]


def respaced(schedule, base: GaussianDiffusion, steps: int) -> tuple[GaussianDiffusion, list[int]]:  # type: ignore[no-untyped-def]
    ts = sorted(schedule.sampling_timesteps(steps).tolist())
    return base.respace(ts), ts


def hand_written(model, diffusion, n: int, iterations: list[int], solver, labels) -> float:  # type: ignore[no-untyped-def]
    """The same DDIM sampling written by hand: noise, model calls with reuse, DDIM updates."""
    gens = [torch.Generator().manual_seed(k) for k in range(n)]
    x = torch.stack([torch.randn((1, 32, 32), generator=g) for g in gens])
    y = torch.tensor([labels[k % len(labels)] for k in range(n)])
    z = None
    start = time.perf_counter()
    with torch.no_grad():
        for step, i in enumerate(reversed(range(diffusion.num_timesteps))):
            index = torch.full((n,), i)
            out = model(x, diffusion.map_timesteps(index), y, z0=z, iters=iterations[step], solver=solver)
            z = out.z
            pred, _ = diffusion.split_output(out.pred, x)  # DDIM, eta 0
            x0, eps = diffusion.predict_x0(pred, x, index), diffusion.predict_eps(pred, x, index)
            ac_prev = diffusion.extract("alphas_cumprod_prev", index, x)
            x = ac_prev.sqrt() * x0 + (1 - ac_prev).sqrt() * eps
    return time.perf_counter() - start


def cuda_xl_step() -> dict | None:
    if not torch.cuda.is_available():
        return None
    from fpdm.models.transformer import FPDM
    from fpdm.plugins.solvers import FixedPointIteration

    model = FPDM().cuda().eval()
    x = torch.randn(64, 4, 32, 32, device="cuda")
    t, y = torch.randint(0, 1000, (64,), device="cuda"), torch.randint(0, 1000, (64,), device="cuda")
    solver, results = FixedPointIteration(), {"device": torch.cuda.get_device_name()}
    for mode in ("eager", "compile"):
        if mode == "compile":
            for m in model.modules():
                if type(m).__name__ == "DiTBlock":
                    m.compile()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):
                model(x, t, y, iters=26, solver=solver)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                model(x, t, y, iters=26, solver=solver)
            torch.cuda.synchronize()
        results[f"{mode}_ms"] = (time.perf_counter() - start) / 10 * 1e3
    return results


def residual_row(
    model, schedule, base, labels, n: int, dit_steps: int, solver_name: str, alloc: tuple, reuse_name: str, registry
) -> dict:  # type: ignore[no-untyped-def]
    """One sampling run under a budget of `dit_steps` DiT-step equivalents: residual, blocks, img/s."""
    label, alloc_name, options = alloc
    budget = dit_steps * DIT_DEPTH
    steps = max(1, budget // BLOCKS_PER_STEP)
    diffusion, ts = respaced(schedule, base, steps)
    allocator = registry.create("allocator", alloc_name, **options)
    plan = plan_iterations(model, ts[::-1], budget=budget, iters=0, allocator=allocator)
    result = generate(
        model,
        diffusion,
        n=n,
        batch_size=n,
        seed=0,
        labels=labels,
        shape=(model.in_channels, model.input_size, model.input_size),
        sampler=DDIM(),
        solver=registry.create("solver", solver_name),
        iterations=plan,
        reuse=registry.create("reuse_policy", reuse_name),
        tol=plan_tolerances(allocator, plan, ts[::-1]),
        adaptive=allocator.tol > 0,
    )
    if int(result.blocks.max()) > budget:
        raise SystemExit(f"{label} spent {int(result.blocks.max())} blocks on a sample, over the budget {budget}")
    residuals = [s["residual_mean"] for s in result.steps]
    return {
        "dit_steps": dit_steps,
        "budget": budget,
        "steps": steps,
        "solver": solver_name,
        "allocator": label,
        "reuse": reuse_name,
        "residual_mean": sum(residuals) / len(residuals),
        "residual_last": residuals[-1],
        "residual_per_step": residuals,
        "iterations_per_step": [s["iterations_mean"] for s in result.steps],
        "blocks_mean": result.blocks.double().mean().item(),
        "blocks_max": int(result.blocks.max()),
        "img_per_s": n / result.seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="two budgets, fewer combinations")
    parser.add_argument("--allocation", action="store_true", help="only the allocator comparison, no timing")
    parser.add_argument("--update-docs", "--update-readme", action="store_true", help="refresh docs/benchmarks.md")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    registry = Registry.load(only=[])
    ckpt = load_checkpoint(args.checkpoint)
    config = from_dict(Config, ckpt.config)
    model = load_denoiser(ckpt, registry=registry)
    schedule = build_schedule(config.diffusion, registry)
    base = GaussianDiffusion(schedule, prediction=config.diffusion.prediction, learn_sigma=config.model.learn_sigma)
    labels = list(range(model.num_classes)) or None
    budgets = [2, 5] if args.quick else [2, 5, 10, 20]
    solvers = ["fixed_point", "anderson"]
    reuses = ["cold", "reuse", "extrapolate"]
    if args.allocation:
        allocators = ALLOCATION[:3] if args.quick else ALLOCATION
    else:  # the adaptive allocator has its own table (--allocation)
        allocators = [
            (a, a, {}) for a in (["uniform", "increasing"] if args.quick else ["uniform", "increasing", "decreasing"])
        ]
    rows = []
    for dit_steps in budgets:
        for solver_name, alloc, reuse_name in itertools.product(solvers, allocators, reuses):
            rows.append(
                residual_row(model, schedule, base, labels, args.n, dit_steps, solver_name, alloc, reuse_name, registry)
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("per_step")}), flush=True)
    command = (
        "python benchmarks/sampling.py"
        + (" --quick" if args.quick else "")
        + (" --allocation" if args.allocation else "")
    )
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    path = ckpt.path.resolve()
    checkpoint = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)  # no home dirs in tables
    if args.allocation:  # no timing here: img/s from a loaded machine would mislead
        rows = [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]
        results = {"command": command, "machine": machine, "checkpoint": checkpoint, "n": args.n, "rows": rows}
        table = allocation_markdown(results)
        publish(
            args.out, "sampling_allocation", results, table, doc="sampling-allocation" if args.update_docs else None
        )
        return 0

    # framework overhead: generate() vs a hand-written loop of the same calls (DDIM, reuse, uniform plan)
    diffusion, _ = respaced(schedule, base, 20)
    plan = [4] * 20
    solver = registry.create("solver", "fixed_point")
    ours, theirs = [], []
    for _ in range(3):
        theirs.append(hand_written(model, diffusion, args.n, plan, solver, labels or [0]))
        ours.append(
            generate(
                model,
                diffusion,
                n=args.n,
                batch_size=args.n,
                seed=0,
                labels=labels,
                shape=(1, 32, 32),
                sampler=DDIM(),
                solver=solver,
                iterations=plan,
                reuse=registry.create("reuse_policy", "reuse"),
            ).seconds
        )
    overhead = {"fpdm_s": min(ours), "hand_written_s": min(theirs), "overhead": min(ours) / min(theirs) - 1}
    results = {
        "command": command,
        "machine": machine,
        "checkpoint": checkpoint,
        "n": args.n,
        "rows": rows,
        "overhead": overhead,
        "cuda_xl_step": cuda_xl_step(),
    }
    table = markdown(results)
    publish(args.out, "sampling", results, table, doc="sampling" if args.update_docs else None)
    return 0


def markdown(results: dict) -> str:
    rows = results["rows"]
    budgets = sorted({r["dit_steps"] for r in rows})
    lines = [
        f"Machine: {results['machine']}; checkpoint `{results['checkpoint']}`, {results['n']} samples, DDIM "
        f"(`{results['command']}`). Mean final relative residual of the fixed-point solves over all steps "
        "(lower = closer to the fixed point the model was trained for); img/s in parentheses.",
        "",
        "| solver | allocator | reuse | "
        + " | ".join(f"{b} DiT steps ({b * DIT_DEPTH} blocks)" for b in budgets)
        + " |",
        "|---|---|---|" + "---|" * len(budgets),
    ]
    keys = sorted({(r["solver"], r["allocator"], r["reuse"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for key in keys:
        cells = []
        for b in budgets:
            r = next(r for r in rows if (r["solver"], r["allocator"], r["reuse"]) == key and r["dit_steps"] == b)
            cells.append(f"{r['residual_mean']:.3g} ({r['img_per_s']:.0f})")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    o = results["overhead"]
    lines += [
        "",
        f"Framework overhead (20 DDIM steps x 4 iterations with reuse, {results['n']} samples): fpdm "
        f"{o['fpdm_s']:.2f} s vs a hand-written loop {o['hand_written_s']:.2f} s ({o['overhead']:+.1%}).",
    ]
    xl = results.get("cuda_xl_step")
    lines.append(
        ""
        if xl is None
        else f"\nFPDM-XL/2 step, batch 64, 26 iterations, bf16 on {xl['device']}: "
        f"eager {xl['eager_ms']:.1f} ms, torch.compile {xl['compile_ms']:.1f} ms."
    )
    return "\n".join(lines) + "\n"


def allocation_markdown(results: dict) -> str:
    """Residual per solver x reuse x allocator and budget; the best allocator of each column group in bold."""
    rows = results["rows"]
    budgets = sorted({r["dit_steps"] for r in rows})
    order = [label for label, _, _ in ALLOCATION]
    spent = (
        "every sample spent exactly its budget"
        if all(r["blocks_max"] == r["blocks_mean"] == r["budget"] for r in rows)
        else "no sample exceeded its budget"
    )
    lines = [
        f"Machine: {results['machine']}; checkpoint `{results['checkpoint']}`, {results['n']} samples, DDIM "
        f"(`{results['command']}`). Mean over the steps of the final relative residual of the fixed-point "
        f"solves at equal budget ({spent}); bold: the lowest of the allocators for that solver, reuse and "
        "budget. Residuals only, no timing.",
        "",
        "| solver | reuse | allocator | "
        + " | ".join(f"{b} DiT steps ({b * DIT_DEPTH} blocks)" for b in budgets)
        + " |",
        "|---|---|---|" + "---|" * len(budgets),
    ]
    groups = sorted({(r["solver"], r["reuse"]) for r in rows})
    for solver, reuse in groups:
        mine = [r for r in rows if (r["solver"], r["reuse"]) == (solver, reuse)]
        best = {b: min(r["residual_mean"] for r in mine if r["dit_steps"] == b) for b in budgets}
        for label in [a for a in order if any(r["allocator"] == a for r in mine)]:
            cells = []
            for b in budgets:
                r = next(r for r in mine if r["allocator"] == label and r["dit_steps"] == b)
                cell = f"{r['residual_mean']:.3g}"
                cells.append(f"**{cell}**" if r["residual_mean"] == best[b] else cell)
            lines.append(f"| {solver} | {reuse} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
