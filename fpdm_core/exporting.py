"""`Pipeline.export` and `fpdm export`: the exporter named by `ExportConfig.format` built from the registry (core
never imports `fpdm.export`, which registers the "onnx" exporter like any plugin), the whole-loop plan, and the
default output path beside the model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fpdm.config import ExportConfig, SampleConfig, make_config, to_dict
from fpdm.diffusion.plan import LoopSpec, sampling_parts
from fpdm.errors import UsageError
from fpdm.interfaces import Denoiser

if TYPE_CHECKING:
    from fpdm.pipeline import Pipeline


def export_report(pipe: Pipeline, config: ExportConfig) -> dict[str, Any]:
    """Build the exporter `config.format` from the registry and run it on the pipeline's denoiser (on the CPU in
    float32); its report ({"path", "kind", "precision", "iters", "parity", ...})."""
    iters = pipe.config.solver.max_iter if config.iters is None else config.iters
    if iters < 1:
        raise UsageError(
            f"iters must be >= 1 to export (the model's solver.max_iter is "
            f"{pipe.config.solver.max_iter}); give iters (--iters K)"
        )
    registry = pipe.registry
    solver_name = config.solver or pipe.config.solver.name
    solver_options = {} if config.solver else dict(pipe.config.solver.options)
    solver = registry.create("solver", solver_name, **solver_options)
    options: dict[str, Any] = {"iters": iters, "fp16": config.fp16, "verify": config.verify}
    if config.opset is not None:
        options["opset"] = config.opset
    exporter = registry.create("exporter", config.format, **options)
    model = pipe.denoiser
    if pipe.device.type != "cpu" or pipe.dtype != torch.float32:  # export traces and checks in fp32 on the CPU
        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    loop = _loop_spec(pipe, model, config, iters) if config.whole_loop else None
    out = Path(config.out) if config.out else _export_path(pipe, config, iters)
    if config.format == "onnx" and out.suffix != ".onnx":
        raise UsageError(f"out must end in .onnx, got {out}")
    source = {
        "checkpoint": None if pipe.path is None else str(pipe.path),
        "step": pipe.step,
        "ema": pipe.weights == "ema",
    }
    return exporter.export(
        model,
        solver=solver,
        solver_info={"name": solver_name, "options": solver_options},
        config=to_dict(pipe.config),
        spec=pipe.spec,
        out=out,
        loop=loop,
        source=source,
    )


def _loop_spec(pipe: Pipeline, model: Denoiser, config: ExportConfig, iters: int) -> LoopSpec:
    assert config.steps is not None  # ExportConfig requires steps with whole_loop
    choices = make_config(
        SampleConfig,
        steps=config.steps,
        spacing=config.spacing,
        budget=config.budget,
        sampler=config.sampler,
        eta=config.eta,
        allocator=config.allocator,
        reuse=config.reuse,
        cfg_scale=config.cfg_scale,
        cfg_channels=config.cfg_channels,
        guidance_rescale=config.guidance_rescale,
        clip_x0=config.clip_x0,
    )
    parts = sampling_parts(pipe.config, model, choices, registry=pipe.registry, iters=iters)
    if parts.adaptive:
        raise UsageError(
            f"allocator {config.allocator!r} decides per sample at run time; a graph needs a fixed "
            "plan (uniform, increasing, decreasing, ramp)"
        )
    return LoopSpec(
        parts.diffusion,
        parts.sampler,
        parts.iterations,
        parts.reuse,
        config.cfg_scale,
        config.cfg_channels,
        config.guidance_rescale,
        config.clip_x0,
        not pipe.is_latent,
        parts.names,
    )


def _export_path(pipe: Pipeline, config: ExportConfig, iters: int) -> Path:
    what = f"loop-s{config.steps}" if config.whole_loop else f"k{iters}"
    name = f"{what}{'-fp16' if config.fp16 else ''}.onnx"
    if pipe.kind == "checkpoint" and pipe.path is not None:
        return pipe.output_dir("export") / f"{pipe.path.name}-{name}"
    return pipe.output_dir("export") / name
