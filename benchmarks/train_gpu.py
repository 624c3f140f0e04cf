"""GPU training-step benchmark at the paper's scale: FPDM-XL/2 vs DiT-XL/2, batch 64, 4x32x32 latents.

    python benchmarks/train_gpu.py [--steps N] [--warmup N] [--only SUBSTRING] [--out DIR]
    python benchmarks/train_gpu.py --smoke        # tiny models on CPU: checks the script, measures nothing useful

Two settings per model, each in its own process so peak memory is its own:
- fast: torch.compile per transformer block (one graph reused by every fixed-point iteration), fused
  attention (F.scaled_dot_product_attention, flash/efficient kernels under bf16), no checkpointing;
- lean: gradient checkpointing of every block and of each grad-phase fixed-point iteration (the no-grad
  phase always runs under torch.no_grad, so it keeps no activations), no compile.
`run_one` takes any other mode name as plain eager without checkpointing (benchmarks/gpu_check.py's
"checkpointing off", the setting of the official figures).
bf16 autocast and TF32 on CUDA. Inputs are random latents and labels (throughput does not depend on them).
FPDM draws the official S-JFB counts per step, n_no_grad ~ U{0..10} and n_grad ~ U{1..12}, from a fixed seed
so both settings see the same sequence. Reports img/s and peak memory (CUDA max_memory_allocated) to
DIR/train_gpu.json and .md (--smoke: train_gpu_smoke.*).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from _report import RESULTS, write_results
from train import measure_steps

MODELS = ("FPDM-XL/2", "DiT-XL/2")
MODES = ("fast", "lean")
NO_GRAD, GRAD = (0, 10), (1, 12)  # official S-JFB ranges
FULL = {"size": 32, "channels": 4, "classes": 1000, "batch": 64, "overrides": {}}
# CPU smoke: the same code paths on a model small enough for seconds per step; compile uses the eager backend
# (dynamo tracing without inductor's C++ build, which would dominate a smoke run).
SMOKE = {
    "size": 8,
    "channels": 4,
    "classes": 10,
    "batch": 4,
    "overrides": {"hidden_size": 32, "num_heads": 2, "depth": 2},
}


def run_one(arch: str, mode: str, *, smoke: bool, steps: int, warmup: int, backend: str) -> dict[str, Any]:
    from fpdm.build import build_denoiser
    from fpdm.config import ModelConfig
    from fpdm.models.transformer import DiTBlock

    size = SMOKE if smoke else FULL
    overrides = dict(size["overrides"])
    if arch.startswith("FPDM"):
        overrides.pop("depth", None)  # FPDM's depth is pre + fixed-point + post
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    torch.manual_seed(0)
    model = build_denoiser(
        ModelConfig(arch=arch, **overrides),
        input_size=size["size"],
        in_channels=size["channels"],
        num_classes=size["classes"],
        checkpoint=mode == "lean",
    ).to(device)
    if mode == "fast":
        for module in model.modules():
            if isinstance(module, DiTBlock):
                module.compile(backend=backend)
    batch = size["batch"]
    x = torch.randn(batch, size["channels"], size["size"], size["size"], device=device)  # (B, 4, S, S) latents
    y = torch.randint(0, size["classes"], (batch,), device=device)
    seen = measure_steps(model, x, y, ranges=(NO_GRAD, GRAD), steps=steps, warmup=warmup)
    times, counts = seen["times"], seen["counts"]
    total, cuda = sum(times), device.type == "cuda"
    fpdm = arch.startswith("FPDM")
    return {
        "arch": f"{arch} (tiny)" if smoke else arch,
        "mode": mode,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": "bf16 autocast" if cuda else "fp32",
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "latent": [size["channels"], size["size"], size["size"]],
        "smoke": smoke,
        "compile": f"per block, backend {backend}" if mode == "fast" else None,
        "checkpointing": mode == "lean",
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "img_per_s": batch * steps / total,
        "s_per_step": total / steps,
        "peak_mem_gib": seen["peak"] / 2**30,
        "peak_kind": "max_memory_allocated" if cuda else "RSS growth",
        "sjfb_ranges": [list(NO_GRAD), list(GRAD)] if fpdm else None,
        "mean_iters": [sum(c[i] for c in counts) / len(counts) for i in (0, 1)] if fpdm else None,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Machine: {results['machine']} (`{results['command']}`).",
        "",
        "| model | setting | device | precision | batch | params | img/s | s/step | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['arch']} | {r['mode']} | {r['device']} | {r['precision']} | {r['batch']} | "
            f"{r['params_m']:.1f}M | {r['img_per_s']:.3g} | {r['s_per_step']:.3f} | "
            f"{r['peak_mem_gib']:.2f} GiB ({r['peak_kind']}) |"
        )
    lines += [
        "",
        "fast: torch.compile per block, fused attention, no checkpointing. lean: checkpointing of every "
        "block and grad-phase iteration. FPDM draws S-JFB counts U{0..10} / U{1..12} per step.",
    ]
    if results["smoke"]:
        lines += ["", "Smoke run: tiny models on CPU; these numbers say nothing about GPU training."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU, 2 steps: checks the script only")
    parser.add_argument("--steps", type=int, help="timed steps per setting (default 20; smoke 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, compile included (default 5; smoke 1)")
    parser.add_argument("--only", help="run the settings whose 'MODEL mode' contains this text")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; smoke eager)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    args = parser.parse_args()
    steps = args.steps or (2 if args.smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    if args.one:
        arch, mode = json.loads(args.one)
        print(json.dumps(run_one(arch, mode, smoke=args.smoke, steps=steps, warmup=warmup, backend=backend)))
        return 0
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("train_gpu.py needs CUDA (batch 64 at XL/2 is out of reach on CPU); use --smoke to check it")
    runs = []
    for arch in MODELS:
        for mode in MODES:
            if args.only and args.only not in f"{arch} {mode}":
                continue
            command = [
                sys.executable,
                __file__,
                "--one",
                json.dumps([arch, mode]),
                "--steps",
                str(steps),
                "--warmup",
                str(warmup),
                "--compile-backend",
                backend,
                *(["--smoke"] if args.smoke else []),
            ]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"benchmark {arch} {mode} failed:\n{proc.stderr[-4000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{arch} {mode}: {runs[-1]['img_per_s']:.3g} img/s, {runs[-1]['peak_mem_gib']:.2f} GiB", flush=True)
    machine = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available() and not args.smoke
        else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    )
    results = {
        "command": "python benchmarks/train_gpu.py" + (" --smoke" if args.smoke else ""),
        "machine": f"{machine}, torch {torch.__version__}",
        "smoke": args.smoke,
        "runs": runs,
    }
    table = markdown(results)
    write_results(args.out, "train_gpu_smoke" if args.smoke else "train_gpu", results, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
