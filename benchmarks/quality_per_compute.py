"""Image quality per model evaluation: fpdm's samplers on one trained FPDM, FID and KID at equal evaluations.

    python benchmarks/quality_per_compute.py [--run runs/demo] [--n 500] [--update-docs]
    python benchmarks/quality_per_compute.py --quick --run RUN --out /tmp/qpc   # a smoke run, seconds

Three tables, every cell from the same starting noise (seed 0, image k from generator (0, k)), guidance off,
the fixed-point solve warm-started from the previous evaluation's solution (reuse):
1. samplers at 5 and 10 model evaluations, 12 iterations per evaluation (issue 15's setting; Heun gets the
   most steps that fit: 3 steps = 5 evaluations, 5 steps = 9);
2. iterations per evaluation at 10 steps (1, 2, 4, 12), with the mean final fixed-point residual of every
   evaluation, to see where warm starts and more iterations stop paying;
3. a large budget (25 steps, 12 iterations): where the model, not the sampler, limits FID.
FID and KID are torch-fidelity's on fpdm's pinned Fashion-MNIST CNN features (fpdm.eval.features, sha256 in
code) against the Fashion-MNIST test split (10,000 images; reference statistics cached in OUT/qpc_cache).
Resumable: finished cells are kept in OUT/quality_per_compute.json and skipped by a rerun with the same
settings. Writes OUT/quality_per_compute.{json,md} and, with --update-docs, the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from _report import RESULTS, ROOT, update_doc, write_results

# (label, sampler, spacing): the samplers compared at equal evaluations.
SAMPLERS = (
    ("ddim", "ddim", "official"),
    ("ddim trailing", "ddim", "trailing"),
    ("euler", "euler", "official"),
    ("heun", "heun", "official"),
    ("dpmpp_2m", "dpmpp_2m", "official"),
    ("dpmpp_3m", "dpmpp_3m", "official"),
    ("unipc", "unipc", "official"),
    ("dpmpp_2m karras", "dpmpp_2m", "karras"),
    ("dpmpp_3m karras", "dpmpp_3m", "karras"),
    ("dpmpp_2m trailing", "dpmpp_2m", "trailing"),
    ("dpmpp_3m trailing", "dpmpp_3m", "trailing"),
    ("unipc trailing", "unipc", "trailing"),
)
EVALUATIONS = (5, 10)
ITERS = 12
ITER_SWEEP = (1, 2, 4, ITERS)  # at 10 steps; the ITERS cell is the samplers table's 10-evaluation cell
# (label, sampler, spacing), each at its best spacing in the samplers table
SWEEP_SAMPLERS = (
    ("ddim", "ddim", "official"),
    ("dpmpp_3m trailing", "dpmpp_3m", "trailing"),
    ("unipc trailing", "unipc", "trailing"),
)
LARGE_STEPS = (25,)
LARGE_SAMPLERS = SWEEP_SAMPLERS


def steps_for(sampler: str, evaluations: int) -> int:
    """The most steps whose evaluations fit: Heun spends 2 per step but the last (2S - 1)."""
    return (evaluations + 1) // 2 if sampler == "heun" else evaluations


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


class Cells:
    """Finished cells in the results JSON, rewritten after each (a rerun with the same settings skips them)."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path, self.settings = path, settings
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.cells: dict[str, Any] = data.get("cells", {}) if data.get("settings") == settings else {}

    def run(self, key: str, measure: Any) -> dict[str, Any]:
        if key not in self.cells:
            self.cells[key] = measure()
            self.save()
        return self.cells[key]

    def save(self, table: str = "") -> None:
        results = {"settings": self.settings, "machine": machine(), "cells": self.cells}
        write_results(self.path.parent, self.path.stem, results, table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo", help="a trained run or packed folder")
    parser.add_argument("--n", type=int, help="samples per cell (default 500; --quick 130, above the 128 features)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few samples, few cells, 1 iteration")
    parser.add_argument("--update-docs", action="store_true", help="refresh the table in docs/benchmarks.md")
    args = parser.parse_args()

    import fpdm
    from fpdm.data.images import to_uint8
    from fpdm.eval.fidelity import cnn_extractor, compute_metrics
    from fpdm.eval.inputs import load_reference
    from fpdm.io.checkpoint import sha256_file

    pipe = fpdm.load(args.run, device="cpu")
    n = args.n or (130 if args.quick else 500)
    reference = load_reference("fashion_mnist", split="test", data_dir=None, limit=n if args.quick else None, seed=0)
    extractor = cnn_extractor(None)
    weights = sorted(Path(pipe.path).glob("*.safetensors")) if pipe.path is not None else []
    settings = {
        "run": str(args.run),
        "model": pipe.config.model.arch,
        "step": pipe.step,
        "weights_sha256": {w.name: sha256_file(w)[:16] for w in weights},
        "n": n,
        "quick": args.quick,
        "extractor": extractor.description,
        "reference": f"Fashion-MNIST test, {reference.images.shape[0]} images",
    }
    cells = Cells(args.out / "quality_per_compute.json", settings)
    cache = args.out / "qpc_cache"

    def measure(sampler: str, spacing: str, steps: int, iters: int) -> dict[str, Any]:
        start = time.perf_counter()
        out = pipe.sample(n=n, steps=steps, sampler=sampler, spacing=spacing, iters=iters, seed=0, batch_size=250)
        metrics = compute_metrics(
            to_uint8(out.images),
            reference.images,
            extractor=extractor,
            prc=False,
            seed=0,
            kid_subset_size=min(1000, n),
            reference_key=f"fmnist-test-{reference.images.shape[0]}-{extractor.cnn.sha256[:16]}",
            cache_dir=cache,
        )
        return {
            "sampler": sampler,
            "spacing": spacing,
            "steps": steps,
            "iters": iters,
            "evaluations": len(out.stats),
            "blocks_per_image": out.blocks.double().mean().item(),
            "fid": metrics["fid"],
            "kid": metrics["kid_mean"],
            "residual_per_evaluation": [s["residual_mean"] for s in out.stats],
            "seconds": time.perf_counter() - start,
        }

    samplers = SAMPLERS[:3] if args.quick else SAMPLERS
    iters = 1 if args.quick else ITERS
    for evaluations in EVALUATIONS[:1] if args.quick else EVALUATIONS:
        for label, sampler, spacing in samplers:
            steps = steps_for(sampler, evaluations)
            cells.run(f"evals|{evaluations}|{label}", lambda s=sampler, p=spacing, k=steps: measure(s, p, k, iters))
    for label, sampler, spacing in SWEEP_SAMPLERS[:1] if args.quick else SWEEP_SAMPLERS:
        for count in ITER_SWEEP[:2] if args.quick else ITER_SWEEP[:-1]:
            cells.run(f"iters|{label}|{count}", lambda s=sampler, p=spacing, i=count: measure(s, p, 10, i))
    if not args.quick:
        for label, sampler, spacing in LARGE_SAMPLERS:
            for steps in LARGE_STEPS:
                cells.run(f"large|{label}|{steps}", lambda s=sampler, p=spacing, k=steps: measure(s, p, k, ITERS))
    table = report(cells.cells, settings)
    cells.save(table)
    if args.update_docs:
        update_doc("quality_per_compute", table)
    print(table)
    return 0


def report(cells: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = [
        f"{settings['model']} at step {settings['step']} ({settings['run']}), {settings['n']} samples per cell, "
        f"guidance off, seed 0, reuse warm starts; FID/KID on {settings['extractor']} vs {settings['reference']}.",
        "",
        "| sampler | " + " | ".join(f"FID @ {e} evals" for e in EVALUATIONS) + " | KID @ 10 evals |",
        "|---|" + "---|" * (len(EVALUATIONS) + 1),
    ]
    base = {e: cells.get(f"evals|{e}|ddim") for e in EVALUATIONS}
    for label, _, _ in SAMPLERS:
        row = []
        for e in EVALUATIONS:
            cell = cells.get(f"evals|{e}|{label}")
            if cell is None:
                row.append("-")
                continue
            ref = base[e]
            change = f" ({100 * (cell['fid'] / ref['fid'] - 1):+.1f}%)" if ref and label != "ddim" else ""
            row.append(f"{cell['fid']:.2f}{change}" + (f" [{cell['evaluations']}]" if cell["evaluations"] != e else ""))
        ten = cells.get(f"evals|10|{label}")
        row.append(f"{ten['kid']:.4f}" if ten else "-")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Percentages: FID change against fpdm's DDIM at the same evaluations; [k]: the evaluations a sampler "
        "actually made when its steps cannot match (Heun).",
        "",
        "Iterations per evaluation at 10 steps (FID, and the mean final fixed-point residual of the first, middle "
        "and last evaluation):",
        "",
        "| sampler | " + " | ".join(f"{k} it" for k in ITER_SWEEP) + " | residual at 1 it (first/mid/last) |",
        "|---|" + "---|" * (len(ITER_SWEEP) + 1),
    ]
    for sampler, _, _ in SWEEP_SAMPLERS:
        row = [cells.get(f"iters|{sampler}|{k}" if k != ITERS else f"evals|10|{sampler}") for k in ITER_SWEEP]
        one = row[0]
        res = one["residual_per_evaluation"] if one else []
        shown = f"{res[0]:.3f} / {res[len(res) // 2]:.3f} / {res[-1]:.3f}" if res else "-"
        lines.append(f"| {sampler} | " + " | ".join(f"{c['fid']:.2f}" if c else "-" for c in row) + f" | {shown} |")
    large = [(s, k) for s, _, _ in LARGE_SAMPLERS for k in LARGE_STEPS if cells.get(f"large|{s}|{k}")]
    if large:
        lines += [
            "",
            "Large budgets (12 iterations per evaluation): "
            + "; ".join(f"{s} {k} steps FID {cells[f'large|{s}|{k}']['fid']:.2f}" for s, k in large)
            + ".",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
