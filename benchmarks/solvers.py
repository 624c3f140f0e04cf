"""Solver benchmark: iterations and time to a relative residual, mixed-batch work, per-iteration overhead.

    python benchmarks/solvers.py [--quick] [--update-docs]

Writes benchmarks/results/solvers.json and solvers.md; --update-docs replaces the table in docs/benchmarks.md.
Targets (issue 2, CPU): overhead per iteration <= 10% of a bare loop for a transformer-block-sized f;
Anderson <= 20 iterations at rate 0.9 and <= 55 at 0.99; a mixed batch spends <= 1.1x the per-sample sum.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from _report import RESULTS, publish
from fpdm.registry import Registry
from fpdm.solving.problems import LinearContraction, symmetric_contraction

TOL = 1e-3
BATCH, TOKENS, WIDTH = 16, 32, 128


class Counted:
    """Counts the batch rows f is evaluated on (the work), through restrictions too."""

    def __init__(self, f, counter: list[int] | None = None, restrictable: bool = True) -> None:  # type: ignore[no-untyped-def]
        self.f, self.counter, self.restrictable = f, counter if counter is not None else [0], restrictable

    def __call__(self, z: Tensor) -> Tensor:
        self.counter[0] += z.shape[0]
        return self.f(z)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        if name == "restrict" and self.restrictable:
            return lambda rows: Counted(self.f.restrict(rows), self.counter)
        raise AttributeError(name)


class MixedLinear:
    """z -> s_i * z A^T + b with a per-row rate s_i: a batch of easy and hard problems at once."""

    def __init__(self, a: Tensor, rates: Tensor, b: Tensor) -> None:
        self.a, self.rates, self.b = a, rates, b

    def __call__(self, z: Tensor) -> Tensor:
        return self.rates[:, None, None] * (z @ self.a.T) + self.b

    def restrict(self, rows: Tensor) -> MixedLinear:
        return MixedLinear(self.a, self.rates[rows], self.b[rows])


class Block(nn.Module):
    """A DiT-sized-for-CPU transformer block as the fixed-point map: z -> block(z + injection)."""

    def __init__(self, width: int = WIDTH, heads: int = 4) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj, self.heads = nn.Linear(width, 3 * width), nn.Linear(width, width), heads
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        x = z + inj  # (B, T, D)
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


def timed(fn, repeats: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    fn()  # warm-up (lazy kernels, allocator)
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def rates_table(registry: Registry, repeats: int) -> list[dict]:
    rows = []
    for rate in (0.5, 0.9, 0.99):
        problem = LinearContraction.random(BATCH, TOKENS, WIDTH, rate, seed=0)
        for name in registry.names("solver"):
            solver = registry.create("solver", name)
            z0 = problem.initial()
            seconds, result = timed(lambda: solver.solve(problem, z0, max_iter=5000, tol=TOL), repeats)
            stats = result.stats  # type: ignore[attr-defined]
            rows.append(
                {
                    "rate": rate,
                    "solver": name,
                    "iterations_max": int(stats.iterations.max()),
                    "iterations_mean": stats.iterations.double().mean().item(),
                    "converged": bool(stats.converged.all()),
                    "ms": seconds * 1e3,
                }
            )
    return rows


def mixed_batch(registry: Registry) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    a = symmetric_contraction(WIDTH, 1.0, generator=gen)
    rates = torch.tensor([0.5, 0.99] * (BATCH // 2))
    problem = MixedLinear(a, rates, torch.randn(BATCH, TOKENS, WIDTH, generator=gen))
    z0 = torch.zeros_like(problem.b)
    rows = []
    for name in registry.names("solver"):
        solver = registry.create("solver", name)
        alone = sum(
            int(
                solver.solve(
                    problem.restrict(torch.tensor([i])), z0[i : i + 1], max_iter=5000, tol=TOL
                ).stats.iterations
            )
            for i in range(BATCH)
        )
        for mode, restrictable, check_every in (
            ("per-sample, compacting", True, 1),
            ("per-sample, check every 4", True, 4),
            ("whole batch (plain callable)", False, 1),
        ):
            f = Counted(problem, restrictable=restrictable)
            solver.solve(f, z0, max_iter=5000, tol=TOL, check_every=check_every)
            rows.append(
                {
                    "solver": name,
                    "mode": mode,
                    "work_rows": f.counter[0],
                    "sum_alone": alone,
                    "ratio": f.counter[0] / alone,
                }
            )
    return rows


def overhead(registry: Registry, repeats: int, iters: int) -> list[dict]:
    """Per-iteration cost of each solver against `for _ in range(iters): z = f(z)`, for a transformer-block f
    and for a near-free f without a fixed point (the bookkeeping cost alone; no solver can stop early). Timings
    are interleaved and the minimum over repeats is kept, the usual guard against other load on a shared machine."""
    torch.manual_seed(0)
    block = Block().eval()
    inj = torch.randn(BATCH, TOKENS, WIDTH)
    z0 = torch.zeros(BATCH, TOKENS, WIDTH)
    maps = {"transformer block": lambda z: block(z, inj), "near-free (roll + 1)": lambda z: z.roll(1, -1) + 1.0}
    modes = {"fixed count (tol=0)": 0.0, "tolerance, host check every iteration": 1e-30}
    rows = []
    with torch.no_grad():
        for map_name, f in maps.items():

            def bare(f=f) -> None:  # type: ignore[no-untyped-def]
                z = z0
                for _ in range(iters):
                    z = f(z)

            runs = {"bare": bare}
            for name in registry.names("solver"):
                solver = registry.create("solver", name)
                for mode, tol in modes.items():
                    runs[(name, mode)] = lambda s=solver, t=tol, f=f: s.solve(f, z0, max_iter=iters, tol=t)
            best = {key: float("inf") for key in runs}
            for _ in range(repeats + 1):  # the first round warms up and counts like any other
                for key, run in runs.items():
                    start = time.perf_counter()
                    result = run()
                    best[key] = min(best[key], time.perf_counter() - start)
                    if result is not None:  # every solver ran all its iterations: equal work
                        assert int(result.stats.iterations.min()) == iters, key
            for key, seconds in best.items():
                if key == "bare":
                    continue
                name, mode = key
                rows.append(
                    {
                        "map": map_name,
                        "solver": name,
                        "mode": mode,
                        "bare_ms_per_iter": best["bare"] / iters * 1e3,
                        "solver_ms_per_iter": seconds / iters * 1e3,
                        "extra_us_per_iter": (seconds - best["bare"]) / iters * 1e6,
                        "overhead": seconds / best["bare"] - 1,
                    }
                )
    return rows


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']} (`{results['command']}`).",
        "",
        f"Iterations to relative residual {TOL:g}, linear contractions, batch {BATCH}, state {TOKENS}x{WIDTH}:",
        "",
        "| rate | solver | iterations (max / mean) | converged | wall ms |",
        "|---|---|---|---|---|",
    ]
    for r in results["rates"]:
        lines.append(
            f"| {r['rate']} | {r['solver']} | {r['iterations_max']} / {r['iterations_mean']:.1f} | "
            f"{'yes' if r['converged'] else 'no'} | {r['ms']:.1f} |"
        )
    lines += [
        "",
        "Mixed batch (half rate 0.5, half 0.99): rows evaluated vs the sum of per-sample iterations solved alone:",
        "",
        "| solver | mode | rows evaluated | sum alone | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in results["mixed"]:
        lines.append(f"| {r['solver']} | {r['mode']} | {r['work_rows']} | {r['sum_alone']} | {r['ratio']:.2f}x |")
    lines += [
        "",
        f"Per-iteration cost against a bare Python loop `z = f(z)` (state {TOKENS}x{WIDTH}, batch {BATCH}, "
        f"{results['overhead_iters']} iterations, best of {results['repeats'] + 1} interleaved runs):",
        "",
        "| f | solver | mode | bare ms/iter | solver ms/iter | extra us/iter | overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["overhead"]:
        lines.append(
            f"| {r['map']} | {r['solver']} | {r['mode']} | {r['bare_ms_per_iter']:.3f} | "
            f"{r['solver_ms_per_iter']:.3f} | {r['extra_us_per_iter']:.0f} | {r['overhead']:+.1%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--update-docs", "--update-readme", action="store_true", help="refresh docs/benchmarks.md")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    repeats = 1 if args.quick else 15
    registry = Registry.load(only=[])  # the built-ins: results must not depend on what else is installed
    results = {
        "command": "python benchmarks/solvers.py" + (" --quick" if args.quick else ""),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "tol": TOL,
        "rates": rates_table(registry, repeats),
        "mixed": mixed_batch(registry),
        "repeats": repeats,
        "overhead_iters": 20,
        "overhead": overhead(registry, repeats, 20),
    }
    table = markdown(results)
    publish(args.out, "solvers", results, table, doc="solvers" if args.update_docs else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
