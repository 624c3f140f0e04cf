"""The paper's claims on a CPU scale: parameters and training memory, and FID under a sampling budget.

    python benchmarks/paper_claims.py [--quick --out /tmp/claims] [--update-docs]

1. Parameters and training peak memory of FPDM vs DiT at equal width and batch (benchmarks/train.py's
   measurement, one process per setting): Fashion-MNIST XS/4 on CPU; XL/2 at batch 64 only when CUDA exists.
   Also train.py's accounting of state + kept activations (fp32 and bf16 autocast, batch 64) for XS/4 and XL/2,
   which needs no GPU.
2. An FPDM-XS/4 and a DiT-XS/4 (same width 128) trained on Fashion-MNIST with EQUAL TRAINING FLOPs: the FLOPs
   of one training step are counted with torch.utils.flop_counter (FPDM's expectation over its S-JFB draws,
   exact because FLOPs are linear in the iteration counts), and DiT gets fpdm_steps x E[FPDM step] / DiT step.
3. FID at 2, 5, 10, 20 DiT-step equivalents (DiT-XS depth 6: 12, 30, 60, 120 block evaluations per sample;
   FPDM spends them as budget // 6 DDIM steps with the allocator's split) for FPDM plain (cold start), + reuse,
   + each ramp, + Anderson, + adaptive allocation, + extrapolated reuse, + reuse with twice the steps at
   one iteration each (budget // 3 steps, the official sampler's trade of iterations for steps), and DiT;
   then fpdm's additions: the multistep samplers dpmpp_3m and unipc with reuse warm starts (at both step
   counts), and DiT under the same samplers. FID and KID are torch-fidelity's on fpdm's pinned Fashion-MNIST
   CNN features (fpdm.eval.features; never Inception FID) against the test split.

Resumable: every finished cell is saved to OUT/paper_claims.json as it completes and a rerun skips it; the
runs live in OUT/paper_claims_runs. Writes OUT/paper_claims.md and OUT/paper_claims.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _paper_claims_grid import ARCHS, BLOCKS_PER_STEP, BUDGETS, DIT_DEPTH, SEEDS_AT_LOWEST, STEP_BLOCKS, VARIANTS
from _report import RESULTS, ROOT, update_doc

PRESET = ROOT / "apps" / "presets" / "fashion_mnist.toml"


class Store:
    """Finished cells in one JSON file, rewritten atomically after each."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        if self.data and self.data.get("settings") != settings:
            raise SystemExit(
                f"{path} was made with other settings {self.data.get('settings')}; use another --out or delete it"
            )
        self.data.update(settings=settings, machine=machine())
        self.data.setdefault("cells", {})

    def get(self, key: str) -> Any:
        return self.data["cells"].get(key)

    def put(self, key: str, value: Any) -> Any:
        self.data["cells"][key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)
        print(f"{key}: {json.dumps(value)[:160]}", flush=True)
        return value


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------------- memory


def memory_cells(store: Store, *, quick: bool) -> None:
    """benchmarks/train.py's run_one, one subprocess per setting so each peak is its own."""
    cuda = torch.cuda.is_available()
    runs = [(name, 64, 2 if quick else 10, 1, False) for name in ("FPDM-XS/4 Fashion-MNIST", "DiT-XS/4 Fashion-MNIST")]
    if cuda:
        runs += [
            (name, 64, 3 if quick else 10, 2, ckpt)
            for name in ("FPDM-XL/2 latent", "DiT-XL/2 latent")
            for ckpt in (True, False)
        ]
    for name, batch, steps, warmup, ckpt in runs:
        key = f"memory|{name}|ckpt={ckpt}"
        if store.get(key) is None:
            store.put(key, measure_apart("run_one", name, batch, steps, warmup, ckpt))
    # Device-independent: parameter/optimizer state + the activations a step keeps, at batch 64, checkpointing
    # off, fp32 and bf16 autocast; XL/2 too (minutes on a CPU), since the paper's claim is about that scale.
    for name in ("FPDM-XS/4 Fashion-MNIST", "DiT-XS/4 Fashion-MNIST", "FPDM-XL/2 latent", "DiT-XL/2 latent"):
        for bf16 in (False, True):
            key = f"accounting|{name}|bf16={bf16}"
            if store.get(key) is None and not (quick and "XL" in name):
                store.put(key, measure_apart("account_memory", name, 64, False, bf16))


# benchmarks/train.py's measurements this script may run in a process of their own (see `measure_apart`).
APART = ("run_one", "account_memory")


def measure_apart(function: str, *args: Any) -> Any:
    """benchmarks/train.py's `function(*args)` in a fresh process, so its memory peak is its own: this script
    reruns itself with the hidden --apart flag. A script's folder is on its own import path, so the sibling
    `train` module imports as the script's other siblings do, with no path edit."""
    command = [sys.executable, __file__, "--apart", json.dumps([function, list(args)])]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{function}{tuple(args)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_apart(spec: str) -> int:
    """The child side of `measure_apart`: print the measurement as one JSON line."""
    import train

    function, args = json.loads(spec)
    if function not in APART:
        raise SystemExit(f"--apart runs one of {', '.join(APART)}, not {function!r}")
    print(json.dumps(getattr(train, function)(*args)))
    return 0


# ---------------------------------------------------------------------------------------------------- training


def step_flops(arch: str, *, n_no_grad: int, n_grad: int, batch: int) -> int:
    """FLOPs of one S-JFB training step (forward + backward) counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from fpdm.build import build_denoiser
    from fpdm.config import ModelConfig
    from fpdm.diffusion.gaussian import GaussianDiffusion
    from fpdm.plugins.schedules import LinearSchedule
    from fpdm.plugins.solvers import FixedPointIteration
    from fpdm.training.loop import sjfb_losses

    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(arch=arch), input_size=32, in_channels=1, num_classes=10)
    x, y = torch.randn(batch, 1, 32, 32), torch.randint(0, 10, (batch,))
    t = torch.randint(0, 1000, (batch,))
    with FlopCounterMode(display=False) as counter:
        losses, _ = sjfb_losses(
            model,
            GaussianDiffusion(LinearSchedule(), learn_sigma=True),
            FixedPointIteration(),
            x,
            t,
            y,
            torch.randn_like(x),
            n_no_grad=n_no_grad,
            n_grad=n_grad,
        )
        losses["loss"].mean().backward()
    return int(counter.get_total_flops())


def compute_plan(store: Store, *, fpdm_steps: int, batch: int) -> dict[str, Any]:
    """DiT steps for equal training FLOPs. FPDM's FLOPs are c0 + a * c1 + b * c2 in its draws (a no-grad,
    b grad iterations), so three counts give the exact expectation over the preset's uniform ranges."""
    key = f"plan|fpdm_steps={fpdm_steps}|batch={batch}"
    if store.get(key) is None:
        from fpdm.config import load_config

        train_cfg = load_config(PRESET).train
        (a_lo, a_hi), (b_lo, b_hi) = train_cfg.no_grad_iters, train_cfg.grad_iters
        base = step_flops(ARCHS["fpdm"], n_no_grad=0, n_grad=1, batch=batch)
        c1 = step_flops(ARCHS["fpdm"], n_no_grad=1, n_grad=1, batch=batch) - base
        c2 = step_flops(ARCHS["fpdm"], n_no_grad=0, n_grad=2, batch=batch) - base
        fpdm = base + c1 * (a_lo + a_hi) / 2 + c2 * ((b_lo + b_hi) / 2 - 1)
        dit = step_flops(ARCHS["dit"], n_no_grad=0, n_grad=1, batch=batch)
        store.put(
            key,
            {
                "fpdm_steps": fpdm_steps,
                "dit_steps": max(1, round(fpdm_steps * fpdm / dit)),
                "fpdm_gflop_per_step": fpdm / 1e9,
                "dit_gflop_per_step": dit / 1e9,
                "batch": batch,
                "sjfb_ranges": [[a_lo, a_hi], [b_lo, b_hi]],
            },
        )
    return store.get(key)


def train_cell(store: Store, family: str, *, steps: int, runs: Path, seed: int) -> Path:
    """Train (or resume) the run; the cell records wall-clock seconds of this process's training."""
    from fpdm.config import load_config
    from fpdm.io.checkpoint import list_checkpoints, load_checkpoint
    from fpdm.training.loop import train

    run = runs / family
    key = f"train|{family}|steps={steps}"
    if store.get(key) is None:
        config = load_config(
            PRESET,
            [
                f"model.arch={ARCHS[family]}",
                f"train.steps={steps}",
                f"train.seed={seed}",
                f"train.out_dir={json.dumps(str(run))}",
                f"train.ckpt_every={max(50, steps // 10)}",
            ],
        )
        done = list_checkpoints(run / "checkpoints")
        start = time.perf_counter()
        if not done or load_checkpoint(run, verify=False).step < steps:
            train(config, resume=bool(done), progress=False)
        store.put(
            key, {"arch": ARCHS[family], "steps": steps, "seconds": time.perf_counter() - start, "resumed": bool(done)}
        )
    return run


# ---------------------------------------------------------------------------------------------------- FID


def fid_cell(
    store: Store,
    key: str,
    *,
    model: Any,
    base: Any,
    schedule: Any,
    variant: str,
    dit_steps: int,
    seed: int,
    n: int,
    reference: Any,
    extractor: Any,
    cache: Path,
) -> None:
    from fpdm.data.images import to_uint8
    from fpdm.diffusion.sampling import generate, plan_iterations, plan_tolerances
    from fpdm.eval.fidelity import compute_metrics
    from fpdm.registry import default_registry

    if store.get(key) is not None:
        return
    family, solver_name, alloc_name, reuse_name, sampler_name = VARIANTS[variant]
    registry = default_registry()
    budget = dit_steps * DIT_DEPTH
    steps = dit_steps if family == "dit" else max(1, budget // STEP_BLOCKS.get(variant, BLOCKS_PER_STEP))
    sampler = registry.create("sampler", sampler_name)
    spacing = sampler.default_spacing  # official for DDIM (the paper's rows), trailing for the multistep ones
    ts = sorted(schedule.sampling_timesteps(steps, spacing=spacing).tolist())
    allocator = registry.create("allocator", alloc_name)
    plan = plan_iterations(model, ts[::-1], budget=budget, iters=0, allocator=allocator)
    result = generate(
        model,
        base.respace(ts),
        n=n,
        batch_size=250,
        seed=seed,
        labels=list(range(10)),
        shape=(1, 32, 32),
        sampler=sampler,
        solver=registry.create("solver", solver_name),
        iterations=plan,
        reuse=registry.create("reuse_policy", reuse_name),
        tol=plan_tolerances(allocator, plan, ts[::-1]),
        adaptive=allocator.tol > 0,
    )
    metrics = compute_metrics(
        to_uint8(result.images),
        reference,
        extractor=extractor,
        prc=False,
        seed=0,
        reference_key=f"fmnist-test-{reference.shape[0]}-{extractor.cnn.sha256[:16]}",
        cache_dir=cache,
    )
    store.put(
        key,
        {
            "variant": variant,
            "sampler": sampler_name,
            "spacing": spacing,
            "dit_steps": dit_steps,
            "budget_blocks": budget,
            "steps": steps,
            "seed": seed,
            "n": n,
            "fid": metrics["fid"],
            "kid": metrics["kid_mean"],
            "blocks_mean": result.blocks.double().mean().item(),
            "blocks_max": int(result.blocks.max()),
            "sampling_seconds": result.seconds,
        },
    )


def fid_cells(store: Store, runs: dict[str, Path], *, n: int, reference: Any, extractor: Any, cache: Path) -> None:
    from fpdm.build import build_schedule, load_denoiser
    from fpdm.config import Config, from_dict
    from fpdm.diffusion.gaussian import GaussianDiffusion
    from fpdm.io.checkpoint import load_checkpoint

    for family, run in runs.items():
        ckpt = load_checkpoint(run)
        config = from_dict(Config, ckpt.config)
        model = load_denoiser(ckpt)
        schedule = build_schedule(config.diffusion)
        base = GaussianDiffusion(schedule, prediction=config.diffusion.prediction, learn_sigma=config.model.learn_sigma)
        for variant, spec in VARIANTS.items():
            if spec[0] != family:
                continue
            for dit_steps in BUDGETS:
                for seed in SEEDS_AT_LOWEST if dit_steps == BUDGETS[0] else SEEDS_AT_LOWEST[:1]:
                    fid_cell(
                        store,
                        f"fid|{variant}|{dit_steps}|seed={seed}",
                        model=model,
                        base=base,
                        schedule=schedule,
                        variant=variant,
                        dit_steps=dit_steps,
                        seed=seed,
                        n=n,
                        reference=reference,
                        extractor=extractor,
                        cache=cache,
                    )


# ---------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: short training, few samples, ~minutes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--n", type=int, help="samples per FID cell (default 5000; --quick 200)")
    parser.add_argument(
        "--fpdm-steps", type=int, help="FPDM training steps (default 2000, the preset's `fpdm train`; --quick 60)"
    )
    parser.add_argument("--extractor", help="fpdm-fmnist-cnn file (default: the one shipped with fpdm)")
    parser.add_argument("--update-docs", "--update-readme", action="store_true", help="refresh docs/paper-claims.md")
    parser.add_argument("--apart", help=argparse.SUPPRESS)  # internal: one measurement of train.py, see measure_apart
    args = parser.parse_args()
    if args.apart:
        return run_apart(args.apart)
    from fpdm.eval.fidelity import cnn_extractor
    from fpdm.eval.inputs import load_reference

    n = args.n or (200 if args.quick else 5000)
    fpdm_steps = args.fpdm_steps or (60 if args.quick else 2000)
    ref_n = 2000 if args.quick else None
    extractor = cnn_extractor(args.extractor)  # None: the shipped file, its sha256 checked
    settings = {
        "quick": args.quick,
        "n": n,
        "fpdm_steps": fpdm_steps,
        "reference_n": ref_n or 10000,
        "budgets": list(BUDGETS),
        "seeds_at_lowest": list(SEEDS_AT_LOWEST),
        "sampler": "per row (ddim unless named)",
        # FIDs from different extractors are not comparable: a results file made with another is refused.
        "extractor_sha256": extractor.cnn.sha256[:16],
    }
    store = Store(args.out / "paper_claims.json", settings)
    started = time.perf_counter()
    memory_cells(store, quick=args.quick)
    plan = compute_plan(store, fpdm_steps=fpdm_steps, batch=64)
    runs_dir = args.out / "paper_claims_runs"
    runs = {
        "fpdm": train_cell(store, "fpdm", steps=plan["fpdm_steps"], runs=runs_dir, seed=0),
        "dit": train_cell(store, "dit", steps=plan["dit_steps"], runs=runs_dir, seed=0),
    }
    reference = load_reference("fashion_mnist", split="test", data_dir=None, limit=ref_n, seed=0).images
    fid_cells(store, runs, n=n, reference=reference, extractor=extractor, cache=args.out / "paper_claims_cache")
    store.data["extractor"] = extractor.description
    store.put("done", {"seconds_this_run": time.perf_counter() - started})
    from _paper_claims_report import markdown, plot

    table = markdown(store.data)
    (args.out / "paper_claims.md").write_text(table)
    plot(store.data, args.out / "paper_claims.png")
    if args.update_docs:
        if args.quick:
            raise SystemExit("--update-docs takes the full run's table, not --quick's")
        update_doc("paper_claims", table, page="paper-claims.md")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
