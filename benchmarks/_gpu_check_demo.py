"""The demo part of benchmarks/gpu_check.py: the demo model's best sampling plan, in images/s per backend."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from _gpu_check_parts import Settings, Sizes

# REFERENCE.md's sampling anchors at 10 model evaluations on the demo model, best FID first: the first one this
# fpdm registers is the plan the demo part times.
SAMPLER_PREFERENCE = ("unipc", "dpmpp_3m", "dpmpp_2m", "ddim")


def demo(settings: Settings) -> dict[str, Any]:
    """The demo model's best plan (SAMPLER_PREFERENCE, 10 steps, the model's iterations, reuse) in images/s on
    every backend: torch fp32 and bf16, the ONNX Runtime step (fp16, IO binding on CUDA, with and without CUDA
    graphs) and, given --loop, a whole-loop export, which runs the plan it was exported with (the best backend
    is chosen among those that run the same plan). A backend that fails is a row with its error."""
    sizes = settings.sizes
    pipe, source = _demo_pipeline(settings)
    names = pipe.registry.names("sampler")
    sampler = next(name for name in SAMPLER_PREFERENCE if name in names)
    plan = {"sampler": sampler, "steps": 10, "iters": pipe.config.solver.max_iter, "reuse": "reuse"}
    cuda = pipe.device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        step = Path(tmp) / f"step-k{plan['iters']}-fp16.onnx"
        backends: list[tuple[str, dict[str, Any], Callable[[], Callable[[int], float]]]] = [
            ("torch fp32", plan, partial(_torch_draw, pipe, plan, sizes.demo_batch, torch.float32)),
            ("torch bf16", plan, partial(_torch_draw, pipe, plan, sizes.demo_batch, torch.bfloat16)),
        ]
        for graphs in (False, True) if cuda else (False,):
            name = f"onnxruntime step fp16{' + CUDA graphs' if graphs else ''}"
            backends.append((name, plan, partial(_ort_step_draw, pipe, plan, sizes, step, graphs)))
        if settings.loop:
            loop = settings.loop
            backends.append(("onnxruntime whole loop", _loop_plan(loop), partial(_ort_loop_draw, loop, sizes)))
        rows = [_row(name, used, make, sizes) for name, used, make in backends]
    same = [r for r in rows if "img_per_s" in r and r["plan"] == plan_text(plan)]
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": source,
        "plan": plan,
        "n": sizes.demo_n,
        "batch_size": sizes.demo_batch,
        "rows": rows,
        "best": max(same, key=lambda r: r["img_per_s"]) if same else None,
    }


def _row(name: str, plan: dict[str, Any], make: Callable[[], Callable[[int], float]], sizes: Sizes) -> dict[str, Any]:
    """One backend's images/s after a warm-up batch (kernels, allocator, ORT's first run, CUDA graph capture)."""
    row: dict[str, Any] = {"backend": name, "plan": plan_text(plan)}
    try:
        draw = make()
        draw(sizes.demo_batch)
        row["img_per_s"] = sizes.demo_n / draw(sizes.demo_n)
    except Exception as exc:  # a backend that does not run is a result to report, not a crash
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    print(json.dumps(row), flush=True)
    return row


def plan_text(plan: dict[str, Any]) -> str:
    return f"{plan['sampler']}, {plan['steps']} steps x {plan['iters']} iterations, {plan['reuse']}"


def _demo_pipeline(settings: Settings) -> tuple[Any, str]:
    """The run given by --run, else a fresh FPDM-XS/4 (the demo's architecture; smaller in the rehearsal) with
    perturbed random weights: no demo model ships yet, and speed does not depend on the weights."""
    import fpdm
    from fpdm.build import denoiser_options
    from fpdm.config import load_config
    from fpdm.pipeline import Pipeline
    from fpdm.registry import default_registry
    from fpdm.testing.denoisers import build

    if settings.run:
        pipe = fpdm.load(settings.run)
        return pipe, f"run {settings.run} (step {pipe.step})"
    config = load_config(overrides=["model.arch=FPDM-XS/4", *settings.sizes.demo_overrides])
    family, options = denoiser_options(
        config.model, input_size=config.data.image_size, in_channels=config.data.channels, num_classes=10
    )  # Fashion-MNIST's 10 classes, as the demo
    registry = default_registry()
    torch.manual_seed(0)
    model = build(lambda: registry.create("denoiser", family, **options))
    pipe = Pipeline(model, config, {"denoiser": family, "options": options, "class_names": []}, registry=registry)
    extra = f" {', '.join(settings.sizes.demo_overrides)}" if settings.sizes.demo_overrides else ""
    return pipe.to("auto"), f"fresh {config.model.arch}{extra}, random weights (no --run: no demo model ships yet)"


def _torch_draw(pipe: Any, plan: dict[str, Any], batch: int, dtype: torch.dtype) -> Callable[[int], float]:
    def draw(n: int) -> float:
        return float(pipe.to(dtype=dtype).sample(n=n, batch_size=batch, seed=0, **plan).seconds)

    return draw


def _ort_step_draw(pipe: Any, plan: dict[str, Any], sizes: Sizes, path: Path, graphs: bool) -> Callable[[int], float]:
    """The plan on the exported step: the samplers and the reuse policy run in PyTorch around ORT's calls."""
    from fpdm.config import ExportConfig, SampleConfig, make_config
    from fpdm.diffusion.plan import generate_planned, sampling_parts
    from fpdm.export.ort import OrtDenoiser, OrtSession
    from fpdm.pipeline import class_ids

    if not path.exists():  # one export serves the step backends
        pipe.to(dtype=torch.float32).export(ExportConfig(iters=plan["iters"], fp16=True, out=str(path)))
    model = OrtDenoiser(OrtSession(path, provider=sizes.provider, cuda_graph=graphs, threads=sizes.ort_threads))
    labels = class_ids(None, pipe.class_names, model.num_classes)
    device = torch.device("cuda" if model.session.cuda else "cpu")

    def draw(n: int) -> float:
        options = make_config(SampleConfig, n=n, batch_size=sizes.demo_batch, seed=0, **plan)
        parts = sampling_parts(pipe.config, model, options, registry=pipe.registry, iters=plan["iters"])
        result = generate_planned(model, parts, options, labels=labels, solver=None, device=device, clip_output=True)
        return float(result.seconds)

    return draw


def _ort_loop_draw(path: str, sizes: Sizes) -> Callable[[int], float]:
    from fpdm.diffusion.sampling import generate_batches
    from fpdm.export.ort import OrtLoop, OrtSession
    from fpdm.pipeline import class_ids

    loop = OrtLoop(OrtSession(path, provider=sizes.provider, threads=sizes.ort_threads))
    labels = class_ids(None, loop.meta["spec"].get("class_names", []), loop.num_classes)

    def draw(n: int) -> float:
        return float(generate_batches(loop, n=n, batch_size=sizes.demo_batch, seed=0, labels=labels).seconds)

    return draw


def _loop_plan(path: str) -> dict[str, Any]:
    """The plan a whole-loop file fixed at export: its sampler, steps, iterations per step (one number when
    they are all equal) and reuse policy."""
    from fpdm.export.onnx import read_metadata

    meta = read_metadata(path)
    sampling, iterations = meta["sampling"], list(meta["iterations"])
    iters = iterations[0] if len(set(iterations)) == 1 else iterations
    return {"sampler": sampling["sampler"], "steps": len(iterations), "iters": iters, "reuse": sampling["reuse"]}
