"""The parts of benchmarks/gpu_check.py. Each runs in its own process (`gpu_check.py --part NAME`) and returns
one JSON-able dict; an exception fails the part and nothing else. `Sizes` says how big: issue 17's GPU sizes,
or tiny ones for the CPU rehearsal, which runs the same code paths so that the script cannot rot.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
RESULT = "GPU_CHECK_RESULT "  # prefix of the one stdout line that carries a part's JSON
# FPDM-XL/2 on a 4x32x32 latent, the reference table's model (random weights: speed does not depend on them).
XL = {
    "input_size": 32,
    "in_channels": 4,
    "patch_size": 2,
    "hidden_size": 1152,
    "num_heads": 16,
    "num_classes": 1000,
    "learn_sigma": True,
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    model: dict[str, Any]  # FPDM options of the forward and ort parts
    batch: int
    iters: tuple[int, ...]  # the forward part's iteration counts
    ort_iters: int  # the ORT step's K, one of `iters` so that the forward part has its torch.compile time
    repeats: int  # timed calls per median
    compile_backend: str  # inductor on CUDA; the rehearsal traces with dynamo and runs eagerly
    train_steps: int
    train_warmup: int
    demo_overrides: tuple[str, ...]  # on top of the demo architecture FPDM-XS/4
    demo_n: int
    demo_batch: int
    provider: str  # ONNX Runtime provider
    ort_threads: int | None  # ONNX Runtime's intra-op threads (None: its default)


GPU = Sizes(
    model=XL,
    batch=64,
    iters=(26, 8),
    # 8, not 26: exporting the 26-iteration XL step took 68 s on the 2-core development machine (8: 12 s),
    # more than the part's 60 s cap leaves beside two ORT sessions and their timing
    ort_iters=8,
    repeats=20,
    compile_backend="inductor",
    train_steps=10,
    train_warmup=3,
    demo_overrides=(),
    demo_n=1024,
    demo_batch=256,
    provider="cuda",
    ort_threads=None,
)
REHEARSAL = Sizes(
    model={**XL, "input_size": 8, "hidden_size": 32, "num_heads": 2, "num_classes": 10},
    batch=4,
    iters=(3, 2),
    ort_iters=2,
    repeats=3,
    compile_backend="eager",
    train_steps=2,
    train_warmup=1,
    demo_overrides=("model.hidden_size=32", "model.num_heads=2", "solver.max_iter=3"),
    demo_n=8,
    demo_batch=8,
    provider="cpu",
    ort_threads=1,  # one thread per process in a rehearsal (gpu_check.child_env says why)
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the parent hands every part (as JSON on its command line)."""

    rehearsal: bool
    run: str | None = None  # --run DIR: the demo model
    loop: str | None = None  # --loop FILE: a whole-loop export of the demo model
    workdir: str | None = None  # the nccl part's data and run folder, for its torchrun worker

    @property
    def sizes(self) -> Sizes:
        return REHEARSAL if self.rehearsal else GPU

    @property
    def arch(self) -> str:
        """The forward and ort parts' model, as the table names it."""
        return "FPDM-XL/2 (tiny)" if self.rehearsal else "FPDM-XL/2"

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_first(fn: Callable[[], object]) -> float:
    """Seconds of one call (the call that compiles, for a compiled model)."""
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ tests
def tests(settings: Settings) -> dict[str, Any]:
    """The gpu-marked tests of the whole suite (without CUDA they are collected and skipped)."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfE", "tests"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else f"pytest printed nothing (exit {proc.returncode})"
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    if proc.returncode != 0:
        failing = [line.split(" ", 1)[1] for line in lines if line.startswith(("FAILED ", "ERROR "))]
        raise RuntimeError(f"pytest exit {proc.returncode}: {summary}; {'; '.join(failing[:5]) or proc.stderr[-300:]}")
    return {"command": "python -m pytest -q -m gpu tests", "summary": summary, "counts": counts}


# ------------------------------------------------------------------------------------------------ training
def train(arch: str, settings: Settings) -> dict[str, Any]:
    """train_gpu.run_one with checkpointing on ("lean") and off ("plain": run_one compiles only in its "fast"
    setting and checkpoints only in "lean", so any other name is the plain eager step the official code runs)."""
    from train_gpu import run_one

    sizes, runs = settings.sizes, []
    for mode in ("lean", "plain"):
        runs.append(
            run_one(
                arch,
                mode,
                smoke=settings.rehearsal,
                steps=sizes.train_steps,
                warmup=sizes.train_warmup,
                backend=sizes.compile_backend,
            )
        )
        print(json.dumps(runs[-1]), flush=True)
        gc.collect()  # the model and optimizer of this setting go before the next one's peak is measured
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"runs": runs}


# ------------------------------------------------------------------------------------------------ forward
def forward(settings: Settings) -> dict[str, Any]:
    """The FPDM-XL/2 sampling forward (no grad, bf16 autocast on CUDA), eager then compiled per block, at every
    iteration count of `sizes.iters`: the median ms of `repeats` calls after warm-up."""
    from export import median_ms
    from fpdm.models.transformer import DiTBlock
    from fpdm.registry import default_registry

    sizes, device = settings.sizes, settings.device
    cuda = device.type == "cuda"
    registry = default_registry()
    torch.manual_seed(0)
    model = registry.create("denoiser", "fpdm", **sizes.model).to(device).eval()
    solver = registry.create("solver", "fixed_point")
    b, c, s = sizes.batch, sizes.model["in_channels"], sizes.model["input_size"]
    x = torch.randn(b, c, s, s, device=device)  # (B, C, S, S) latents
    t = torch.randint(0, 1000, (b,), device=device)
    y = torch.randint(0, sizes.model["num_classes"], (b,), device=device)
    rows = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        for mode in ("eager", "compile"):
            if mode == "compile":  # one graph per block, reused by every fixed-point iteration
                for module in model.modules():
                    if isinstance(module, DiTBlock):
                        module.compile(backend=sizes.compile_backend)
            for k in sizes.iters:

                def call(k: int = k) -> object:
                    return model(x, t, y, iters=k, solver=solver)

                first = _timed_first(call)
                rows.append(
                    {"mode": mode, "iters": k, "first_call_s": first, "ms": median_ms(call, sizes.repeats, _sync)}
                )
                print(json.dumps(rows[-1]), flush=True)
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "arch": settings.arch,
        "precision": "bf16 autocast" if cuda else "fp32",
        "batch": b,
        "model": sizes.model,
        "compile": f"per DiTBlock, backend {sizes.compile_backend}",
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------ ort
def ort(settings: Settings) -> dict[str, Any]:
    """The FPDM-XL/2 step graph (K = sizes.ort_iters, fp16), exported here, under ONNX Runtime with IO binding on
    CUDA (with and without CUDA graphs); parity against PyTorch fp32 and torch eager ms on the same inputs. The
    torch.compile comparison comes from the forward part (same model, batch and K)."""
    import onnxruntime

    from export import export_step, median_ms
    from fpdm.export.onnx import example_inputs
    from fpdm.registry import default_registry
    from fpdm.testing.denoisers import build

    sizes, device = settings.sizes, settings.device
    cuda, k = device.type == "cuda", sizes.ort_iters
    registry = default_registry()
    torch.manual_seed(0)
    # perturbed weights: adaLN-Zero's zero output layer would make any parity check pass
    model = build(lambda: registry.create("denoiser", "fpdm", **sizes.model))
    solver = registry.create("solver", "fixed_point")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"step-k{k}-fp16.onnx"
        export_s = _timed_first(lambda: export_step(model, "fixed_point", k, path, options=sizes.model, fp16=True))
        size_mb = path.stat().st_size / 2**20
        model = model.to(device)
        x = {name: v.to(device) for name, v in example_inputs(model, sizes.batch).items()}

        def torch_call(half: bool) -> Any:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
                return model(x["x_t"], x["t"], x["y"], z0=x["z0"], iters=k, solver=solver)

        want = torch_call(False).pred.float()  # (B, C_out, S, S) fp32 reference
        rows = [_ort_row(path, sizes, graphs, x, want) for graphs in ((False, True) if cuda else (False,))]
        if not any("ms" in r for r in rows):
            raise RuntimeError(f"no ONNX Runtime session ran: {rows[0]['error']}")
        eager_ms = median_ms(lambda: torch_call(cuda), sizes.repeats, _sync)
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "arch": settings.arch,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_path": str(Path(onnxruntime.__file__).parent),
        "iters": k,
        "batch": sizes.batch,
        "precision": "fp16 graph (fp32 inputs and outputs)",
        "export_s": export_s,
        "onnx_mib": size_mb,
        "torch_eager_ms": eager_ms,
        "torch_eager_precision": "bf16 autocast" if cuda else "fp32",
        "rows": rows,
    }


def _ort_row(path: Path, sizes: Sizes, graphs: bool, x: dict[str, torch.Tensor], want: torch.Tensor) -> dict[str, Any]:
    """One ONNX Runtime session on the step graph: its real providers, parity and median ms, or its error (a
    session that does not start, e.g. CUDA graphs with a node left on the CPU, is a result, not a crash)."""
    from export import median_ms
    from fpdm.export.ort import OrtDenoiser, OrtSession

    row: dict[str, Any] = {"cuda_graphs": graphs}
    try:
        session = OrtSession(path, provider=sizes.provider, cuda_graph=graphs, threads=sizes.ort_threads)
        step = OrtDenoiser(session)

        def call() -> Any:
            return step(x["x_t"], x["t"], x["y"], z0=x["z0"], iters=step.iters)

        got = call().pred.float().to(want.device)  # (B, C_out, S, S)
        row.update(
            provider=session.provider,
            providers=session.session.get_providers(),
            io_binding=session.cuda,
            max_rel_err_vs_torch_fp32=((got - want).abs().max() / want.abs().max()).item(),
            ms=median_ms(call, sizes.repeats, _sync),
        )
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    print(json.dumps(row), flush=True)
    return row


# ------------------------------------------------------------------------------------------------ nccl
TRAIN_OVERRIDES = (
    "model.arch=FPDM-XS/2",
    "model.hidden_size=32",
    "model.num_heads=2",
    "data.name=image_folder",
    "data.image_size=8",
    "train.batch_size=8",
    "train.steps=4",
    "train.log_every=2",
    "train.ckpt_every=4",
    "train.no_grad_iters=[0, 3]",
    "train.grad_iters=[1, 2]",
)


def nccl(settings: Settings) -> dict[str, Any]:
    """A 1-process torchrun of a few `fpdm.training.loop.train` steps: NCCL on CUDA (NCCL_DEBUG=INFO shows its
    communicator coming up), gloo on the CPU. Two processes would need two GPUs."""
    gpus = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        _images(Path(tmp) / "images")
        worker = dataclasses.replace(settings, workdir=tmp)
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "1",
            str(SCRIPT),
            "--part",
            "nccl-worker",
            "--settings",
            json.dumps(dataclasses.asdict(worker)),
        ]
        env = {**os.environ, "NCCL_DEBUG": "INFO"}
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    said = proc.stdout + proc.stderr
    if proc.returncode != 0:
        errors = [line for line in said.splitlines() if re.search(r"Error|error:|refused|failed", line)]
        raise RuntimeError(
            f"torchrun exit {proc.returncode}: {(errors or said.splitlines() or ['no output'])[-1][:300]}"
        )
    result = parse_result(proc.stdout)
    if result is None:
        raise RuntimeError("torchrun finished but its worker printed no result")
    return {
        **result,
        "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if gpus else None,
        "nccl_init_complete": "Init COMPLETE" in said,
        "gpus": gpus,
        "note": f"a 2-process run needs 2 GPUs; this machine has {gpus}",
    }


def _images(root: Path) -> None:
    """Two classes of 8x8 gray PNGs, enough for `data.name=image_folder`."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for label, level in (("bright", 200), ("dark", 60)):
        (root / label).mkdir(parents=True)
        for i in range(8):
            pixels = (level + 30 * torch.randn(8, 8, generator=gen)).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / label / f"{i}.png")


def nccl_worker(settings: Settings) -> dict[str, Any]:
    """torchrun's rank: train the tiny config on the images the nccl part wrote (train joins the process group)."""
    from fpdm.build import resolve_device
    from fpdm.config import load_config
    from fpdm.training.loop import train as train_loop

    work = Path(settings.workdir or ".")
    config = load_config(
        overrides=[
            *TRAIN_OVERRIDES,
            f"data.path={json.dumps(str(work / 'images'))}",
            f"train.out_dir={json.dumps(str(work / 'run'))}",
        ]
    )
    start = time.perf_counter()
    result = train_loop(config, progress=False)
    device = resolve_device(config.train.device)
    return {
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "backend": "nccl" if device.type == "cuda" else "gloo",  # fpdm.training.distributed's rule
        "device": str(device),
        "steps": result.step,
        "seconds": time.perf_counter() - start,
        "last_loss": next((h["loss"] for h in reversed(result.history) if "loss" in h), None),
    }


def parse_result(stdout: str) -> dict[str, Any] | None:
    lines = [line[len(RESULT) :] for line in stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1]) if lines else None
