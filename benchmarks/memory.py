"""Long-run memory benchmark: many sampling batches in one process, solution reuse on, RSS after every batch.

    python benchmarks/memory.py [--checkpoint runs/demo] [--batches 50] [--batch-size 8] [--steps 5] [--iters 3]

Without --checkpoint (or when it does not exist) the FPDM-XS/4 of the fashion_mnist preset is built with
random weights: memory does not depend on what the weights learned. The reuse policy's state lives in the
sampler and is dropped at the end of every batch, so resident memory should level off after the first
batches; the run records the RSS after each batch (from /proc/self/status, Linux), the peak (VmHWM) and the
growth between batch 5 and the last. Writes benchmarks/results/memory.json and memory.md.
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from pathlib import Path

import torch

from _report import RESULTS, write_results
from fpdm.build import build_denoiser, build_schedule, load_denoiser
from fpdm.config import Config, from_dict, load_config
from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.diffusion.sampling import generate
from fpdm.io.checkpoint import load_checkpoint
from fpdm.plugins.samplers import DDPM
from fpdm.registry import Registry

PRESET = Path(__file__).resolve().parents[1] / "apps" / "presets" / "fashion_mnist.toml"


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {field}: this benchmark needs Linux")


def model_and_config(checkpoint: str | None, registry: Registry) -> tuple[torch.nn.Module, Config, str]:
    if checkpoint and Path(checkpoint).exists():
        ckpt = load_checkpoint(checkpoint)
        return load_denoiser(ckpt, registry=registry), from_dict(Config, ckpt.config), str(ckpt.path)
    config = load_config(PRESET)
    model = build_denoiser(
        config.model,
        input_size=config.data.image_size,
        in_channels=config.data.channels,
        num_classes=10,
        registry=registry,
    ).eval()
    return model, config, "random weights (fashion_mnist preset)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.manual_seed(0)
    registry = Registry.load(only=[])
    model, config, source = model_and_config(args.checkpoint, registry)
    schedule = build_schedule(config.diffusion, registry)
    base = GaussianDiffusion(schedule, prediction=config.diffusion.prediction, learn_sigma=config.model.learn_sigma)
    timesteps = sorted(schedule.sampling_timesteps(args.steps).tolist())
    diffusion = base.respace(timesteps)
    rss: list[int] = []

    def after_batch(_: int) -> None:
        gc.collect()  # count what is still referenced, not garbage waiting for a collection
        rss.append(status_kib("VmRSS"))

    start_kib = status_kib("VmRSS")
    start = time.perf_counter()
    generate(
        model,
        diffusion,
        n=args.batches * args.batch_size,
        batch_size=args.batch_size,
        seed=0,
        labels=list(range(model.num_classes)) or None,
        progress=after_batch,
        shape=(model.in_channels, model.input_size, model.input_size),
        sampler=DDPM(),
        solver=registry.create("solver", "fixed_point"),
        iterations=[args.iters] * args.steps,
        reuse=registry.create("reuse_policy", "reuse"),
    )
    seconds = time.perf_counter() - start
    settled = rss[min(4, len(rss) - 1)]
    results = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "model": source,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "iters": args.iters,
        "reuse": "reuse",
        "rss_before_kib": start_kib,
        "rss_after_batch_kib": rss,
        "rss_batch5_kib": settled,
        "rss_last_kib": rss[-1],
        "growth_batch5_to_last_kib": rss[-1] - settled,
        "peak_rss_kib": status_kib("VmHWM"),
        "seconds": seconds,
    }
    table = (
        "| batches x size | steps x iters | RSS after batch 5 | RSS after last | growth | peak RSS |\n"
        "|---|---|---|---|---|---|\n"
        f"| {args.batches} x {args.batch_size} | {args.steps} x {args.iters} | {settled / 1024:.1f} MiB | "
        f"{rss[-1] / 1024:.1f} MiB | {(rss[-1] - settled) / 1024:+.1f} MiB | "
        f"{results['peak_rss_kib'] / 1024:.1f} MiB |\n"
    )
    write_results(args.out, "memory", results, table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
