"""Training-step benchmark: images/s and peak memory of FPDM vs DiT at equal width and batch.

    python benchmarks/train.py [--quick] [--update-docs] [--only NAME]

Each setting runs in its own process so peak memory is its own (CUDA: max_memory_allocated; CPU: peak RSS
growth over the process after building the model). Settings: the default Fashion-MNIST sizes, and XL/2 on
a 4x32x32 latent (batch 64 with bf16 on CUDA, the reference table's setting; a small batch on CPU, where
batch 64 does not fit the time or memory). S-JFB iteration counts are drawn per step from the configured
ranges with a fixed seed, so FPDM and DiT see the same sequence of steps. Writes
benchmarks/results/train.json and train.md; --update-docs refreshes the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from _report import RESULTS, publish

# name -> (arch, overrides, input size, channels, classes, S-JFB ranges)
SETTINGS = {
    "FPDM-XS/4 Fashion-MNIST": ("FPDM-XS/4", {}, 32, 1, 10, ([0, 3], [1, 3])),
    "DiT-XS/4 Fashion-MNIST": ("DiT-XS/4", {}, 32, 1, 10, ([0, 3], [1, 3])),
    "FPDM-XL/2 latent": ("FPDM-XL/2", {}, 32, 4, 1000, ([0, 10], [1, 12])),
    "DiT-XL/2 latent": ("DiT-XL/2", {}, 32, 4, 1000, ([0, 10], [1, 12])),
}


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_steps(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, ranges: tuple, steps: int, warmup: int
) -> dict:
    """Time S-JFB training steps (AdamW, bf16 autocast on CUDA) on fixed inputs. FPDM's iteration counts are
    drawn per step from `ranges` with a fixed seed, so every setting sees the same sequence. Returns per-step
    seconds after `warmup`, the drawn (no-grad, grad) counts and the peak memory in bytes: CUDA
    max_memory_allocated from the first timed step (compile and allocator warm-up excluded), CPU RSS growth."""
    from fpdm.diffusion.gaussian import GaussianDiffusion
    from fpdm.plugins.schedules import LinearSchedule
    from fpdm.plugins.solvers import FixedPointIteration
    from fpdm.training.loop import sjfb_losses

    (no_grad, grad), device = ranges, x.device
    cuda = device.type == "cuda"
    diffusion = GaussianDiffusion(LinearSchedule(), learn_sigma=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    solver = FixedPointIteration()
    gen = torch.Generator().manual_seed(0)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    times, counts = [], []
    base_rss = rss_bytes()
    for step in range(warmup + steps):
        if step == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        n_no_grad = int(torch.randint(no_grad[0], no_grad[1] + 1, (1,), generator=gen))
        n_grad = int(torch.randint(grad[0], grad[1] + 1, (1,), generator=gen))
        t = torch.randint(0, 1000, (x.shape[0],), device=device)
        noise = torch.randn_like(x)
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            losses, _ = sjfb_losses(model, diffusion, solver, x, t, y, noise, n_no_grad=n_no_grad, n_grad=n_grad)
            loss = losses["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            counts.append((n_no_grad, n_grad))
    peak = torch.cuda.max_memory_allocated() if cuda else rss_bytes() - base_rss
    return {"times": times, "counts": counts, "peak": peak}


def run_one(name: str, batch: int, steps: int, warmup: int, checkpoint: bool) -> dict:
    from fpdm.build import build_denoiser
    from fpdm.config import ModelConfig

    arch, overrides, size, channels, classes, (no_grad, grad) = SETTINGS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_denoiser(
        ModelConfig(arch=arch, **overrides),
        input_size=size,
        in_channels=channels,
        num_classes=classes,
        checkpoint=checkpoint,
    ).to(device)
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    seen = measure_steps(model, x, y, ranges=(no_grad, grad), steps=steps, warmup=warmup)
    total = sum(seen["times"])
    cuda = device.type == "cuda"
    return {
        "setting": name,
        "arch": arch,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": "bf16 autocast" if cuda else "fp32",
        "batch": batch,
        "steps": steps,
        "checkpointing": checkpoint,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "img_per_s": batch * steps / total,
        "s_per_step": total / steps,
        "peak_mem_gib": seen["peak"] / 2**30,
        "peak_kind": "max_memory_allocated" if cuda else "RSS growth",
        "sjfb_ranges": [no_grad, grad] if arch.startswith("FPDM") else None,
    }


def saved_bytes(
    model: torch.nn.Module,
    batch: int,
    size: int,
    channels: int,
    classes: int,
    *,
    n_no_grad: int,
    n_grad: int,
    bf16: bool = False,
) -> int:
    """Bytes of the tensors autograd keeps for backward in one training step on the CPU (fp32, or under bf16
    autocast as GPU training runs), counted through saved_tensors_hooks, one count per storage, parameters
    excluded: the activation memory a step holds at the end of its forward pass, whatever the allocator does."""
    from fpdm.diffusion.gaussian import GaussianDiffusion
    from fpdm.plugins.schedules import LinearSchedule
    from fpdm.plugins.solvers import FixedPointIteration
    from fpdm.training.loop import sjfb_losses

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen)
    y, t = torch.randint(0, classes, (batch,), generator=gen), torch.randint(0, 1000, (batch,), generator=gen)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
    ):
        losses, _ = sjfb_losses(
            model,
            GaussianDiffusion(LinearSchedule(), learn_sigma=True),
            FixedPointIteration(),
            x,
            t,
            y,
            torch.randn(x.shape, generator=gen),
            n_no_grad=n_no_grad,
            n_grad=n_grad,
        )
    losses["loss"].mean().backward()  # the graph was complete: everything it saved was counted
    return sum(kept.values())


def account_memory(name: str, batch: int, checkpoint: bool, bf16: bool = False) -> dict:
    """Training memory at `batch` by accounting rather than an allocator's peak: parameters + gradients + the
    two AdamW moments (4 x fp32 parameter bytes) + the activations a step keeps for backward. Activations are
    counted at batch 1, 2 and 3 and must be exactly affine in the batch (every kept tensor has a batch axis,
    save autocast's bf16 copies of the weights), which gives `batch` without running it. FPDM runs its
    largest S-JFB grad-phase draw, the step that sets the peak. The count is the same on every device;
    `bf16` runs the forward under bf16 autocast, as GPU training does."""
    from fpdm.build import build_denoiser
    from fpdm.config import ModelConfig

    arch, overrides, size, channels, classes, (_, grad) = SETTINGS[name]
    torch.manual_seed(0)
    model = build_denoiser(
        ModelConfig(arch=arch, **overrides),
        input_size=size,
        in_channels=channels,
        num_classes=classes,
        checkpoint=checkpoint,
    )
    n_grad = grad[1]
    one, two, three = (
        saved_bytes(model, b, size, channels, classes, n_no_grad=0, n_grad=n_grad, bf16=bf16) for b in (1, 2, 3)
    )
    per_sample, fixed = two - one, 2 * one - two  # fixed: autocast's bf16 copies of the weights
    if three != fixed + 3 * per_sample or fixed < 0:
        raise RuntimeError(
            f"{name}: kept activations are not affine in the batch ({one}, {two}, {three} bytes at batch 1, 2, 3)"
        )
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "setting": name,
        "arch": arch,
        "batch": batch,
        "checkpointing": checkpoint,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "grad_iters": n_grad if arch.startswith("FPDM") else None,
        "params_m": param_bytes / 4 / 1e6,
        "state_gib": 4 * param_bytes / 2**30,
        "activations_gib": (fixed + batch * per_sample) / 2**30,
        "total_gib": (4 * param_bytes + fixed + batch * per_sample) / 2**30,
    }


def plan(quick: bool) -> list[tuple[str, int, int, int, bool]]:
    """(setting, batch, steps, warmup, checkpointing) per run for this machine."""
    cuda = torch.cuda.is_available()
    fm_steps = 5 if quick else 20
    runs = [(name, 64, fm_steps, 2, False) for name in SETTINGS if "Fashion" in name]
    if cuda:
        runs += [(name, 64, 5 if quick else 20, 3, ckpt) for name in SETTINGS if "XL" in name for ckpt in (True, False)]
    else:  # batch 64 XL/2 on 2 CPU cores would take minutes per step and more memory than the machine has
        runs += [(name, 2, 1 if quick else 2, 1, True) for name in SETTINGS if "XL" in name]
    return runs


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']} (`{results['command']}`).",
        "",
        "| setting | device | precision | batch | checkpointing | params | img/s | s/step | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['setting']} | {r['device']} | {r['precision']} | {r['batch']} | "
            f"{'on' if r['checkpointing'] else 'off'} | {r['params_m']:.1f}M | {r['img_per_s']:.3g} | "
            f"{r['s_per_step']:.3f} | {r['peak_mem_gib']:.2f} GiB ({r['peak_kind']}) |"
        )
    lines += [
        "",
        "FPDM rows draw S-JFB iteration counts per step (Fashion-MNIST preset 0-3 / 1-3, "
        "official 0-10 / 1-12 for XL/2); DiT rows run their full depth.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--update-docs", "--update-readme", action="store_true", help="refresh docs/benchmarks.md")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    args = parser.parse_args()
    if args.one:
        name, batch, steps, warmup, ckpt = json.loads(args.one)
        print(json.dumps(run_one(name, batch, steps, warmup, ckpt)))
        return 0
    runs = []
    for item in plan(args.quick):
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(item)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"benchmark {item} failed:\n{proc.stderr}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{item[0]}: {runs[-1]['img_per_s']:.1f} img/s, {runs[-1]['peak_mem_gib']:.2f} GiB", flush=True)
    machine = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    )
    results = {
        "command": "python benchmarks/train.py" + (" --quick" if args.quick else ""),
        "machine": f"{machine}, torch {torch.__version__}",
        "runs": runs,
    }
    table = markdown(results)
    publish(
        args.out,
        "train_cuda" if torch.cuda.is_available() else "train",
        results,
        table,
        doc="train" if args.update_docs else None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
