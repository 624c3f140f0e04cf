"""The markdown table and the FID-vs-budget plot of benchmarks/paper_claims.py, from its JSON."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from _paper_claims_grid import BUDGETS, DIT_DEPTH, SEEDS_AT_LOWEST, VARIANTS


def fid_at(cells: dict[str, Any], variant: str, dit_steps: int) -> list[dict[str, Any]]:
    seeds = SEEDS_AT_LOWEST if dit_steps == BUDGETS[0] else SEEDS_AT_LOWEST[:1]
    return [cells[k] for s in seeds if (k := f"fid|{variant}|{dit_steps}|seed={s}") in cells]


def _cell(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "-"
    fids = [r["fid"] for r in rows]
    kid = statistics.fmean(r["kid"] for r in rows)
    if len(fids) > 1:
        return f"{statistics.fmean(fids):.2f} ± {statistics.stdev(fids):.2f} ({kid:.3g})"
    return f"{fids[0]:.2f} ({kid:.3g})"


def markdown(data: dict[str, Any]) -> str:
    cells, s = data["cells"], data["settings"]
    lines = [
        f"Machine: {data['machine']} (`python benchmarks/paper_claims.py{' --quick' if s['quick'] else ''}`).",
        "",
        "**Parameters and training peak memory, equal width and batch** (S-JFB draws for FPDM; CPU peak is "
        "RSS growth, CUDA max_memory_allocated):",
        "",
        "| model | device | precision | batch | checkpointing | params | peak memory | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in cells.items():
        if key.startswith("memory|"):
            lines.append(
                f"| {r['arch']} | {r['device']} | {r['precision']} | {r['batch']} | "
                f"{'on' if r['checkpointing'] else 'off'} | {r['params_m']:.2f}M | "
                f"{r['peak_mem_gib']:.2f} GiB | {r['s_per_step']:.3f} |"
            )
    accounted = [r for k, r in cells.items() if k.startswith("accounting|")]
    if accounted:
        lines += [
            "",
            "**Training memory by accounting** (`benchmarks/train.py`'s `account_memory`: parameters, "
            "gradients and AdamW moments + the activations a step keeps for backward, counted on the CPU; "
            "batch 64, checkpointing off; FPDM at its largest S-JFB grad draw, the step that sets the peak):",
            "",
            "| model | precision | grad iters | params | state | activations | total | FPDM / DiT |",
            "|---|---|---|---|---|---|---|---|",
        ]
        totals = {(r["arch"], r["precision"]): r["total_gib"] for r in accounted}
        for r in accounted:
            dit = totals.get((r["arch"].replace("FPDM", "DiT"), r["precision"]))
            ratio = f"{r['total_gib'] / dit:.0%}" if r["arch"].startswith("FPDM") and dit else ""
            lines.append(
                f"| {r['arch']} | {r['precision']} | {r['grad_iters'] or '-'} | {r['params_m']:.1f}M | "
                f"{r['state_gib']:.2f} GiB | {r['activations_gib']:.2f} GiB | {r['total_gib']:.2f} GiB | "
                f"{ratio} |"
            )
    plan = next(v for k, v in cells.items() if k.startswith("plan|"))
    trained = {v["arch"]: v for k, v in cells.items() if k.startswith("train|")}
    wall = ", ".join(
        f"{arch} {v['seconds']:.0f} s" + (" (the part after a resume)" if v["resumed"] else "")
        for arch, v in trained.items()
    )
    lines += [
        "",
        f"**Equal training compute.** FPDM-XS/4 {plan['fpdm_steps']} steps x "
        f"{plan['fpdm_gflop_per_step']:.2f} GFLOP (expected over S-JFB draws {plan['sjfb_ranges']}) = DiT-XS/4 "
        f"{plan['dit_steps']} steps x {plan['dit_gflop_per_step']:.2f} GFLOP, batch {plan['batch']}, "
        f"FLOPs counted by torch.utils.flop_counter (forward + backward). Wall-clock: {wall}.",
        "",
        f"**FID (fpdm-fmnist-cnn features), lower is better; KID in parentheses.** "
        f"{s['n']} samples per cell vs {s['reference_n']} Fashion-MNIST test images, DDIM unless the row "
        "names another sampler (one model evaluation per step each), classes cycled; mean ± std over seeds "
        f"{list(SEEDS_AT_LOWEST)} at the lowest budget. Budget = DiT-step equivalents ({DIT_DEPTH} block "
        "evaluations each); FPDM spends it as budget // 6 steps (pre + 4 iterations + post each), "
        '"2x steps" as budget // 3 steps of 1 iteration.',
        "",
        "| variant | " + " | ".join(f"{b} ({b * DIT_DEPTH} blocks)" for b in BUDGETS) + " |",
        "|---|" + "---|" * len(BUDGETS),
    ]
    for variant in VARIANTS:
        lines.append(f"| {variant} | " + " | ".join(_cell(fid_at(cells, variant, b)) for b in BUDGETS) + " |")
    lines += [
        "",
        f"Extractor: {data.get('extractor', '?')}. FID here is not Inception FID and is not comparable "
        "to published numbers; it ranks the rows of this table.",
    ]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    """Two panels (the plot palette has six colours): start policies, then allocation and solvers; DiT on both."""
    from fpdm.apps.plots import draw_plot, save_png, stack_images

    series = {}
    for variant in VARIANTS:
        points = [
            (float(b), statistics.fmean(r["fid"] for r in rows))
            for b in BUDGETS
            if (rows := fid_at(data["cells"], variant, b))
        ]
        if points:
            series[variant] = points
    names = list(VARIANTS)
    groups = [
        [names[0], names[1], names[6], names[7], names[8]],
        [names[1], *names[2:6], names[8]],
        [names[1], names[7], *names[9:13]],
        [names[8], *names[13:15], names[9], names[10]],
    ]
    titles = (
        "FID vs budget: initial iterate, steps",
        "FID vs budget: allocation, solver",
        "FID vs budget: multistep samplers (FPDM)",
        "FID vs budget: DiT and FPDM, multistep",
    )
    panels = [
        draw_plot(
            shown,
            title=title,
            log_y=True,
            xlabel="budget (DiT-step equivalents)",
            ylabel="FID (fpdm-fmnist-cnn features)",
        )
        for group, title in zip(groups, titles)
        if (shown := {k: series[k] for k in group if k in series})
    ]
    save_png(stack_images(panels), path)
