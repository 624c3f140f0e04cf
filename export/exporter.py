"""The `onnx` exporter: one denoising step (or the whole loop) to a checked, verified, self-describing .onnx.

Registered through the same `register_exporters` hook a third-party exporter uses. An exporter is a factory
of objects with `export(model, *, solver, config, spec, source, out, loop=None) -> dict` (the report).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import attrs
import torch
from attrs import validators as v
from torch import Tensor, nn

from fpdm.diffusion.plan import LoopSpec  # what Pipeline.export hands an exporter for a whole loop
from fpdm.diffusion.sampling import as_sampler
from fpdm.errors import FpdmRuntimeError, UsageError
from fpdm.export.loop import SamplingLoop, noise_draws
from fpdm.export.onnx import (
    DEFAULT_OPSET,
    MIN_OPSET,
    DenoisingStep,
    example_inputs,
    export_metadata,
    input_names,
    output_names,
    parity,
    trace,
    write_onnx,
)
from fpdm.hookspecs import Register, hookimpl
from fpdm.interfaces import Denoiser, Solver, is_fixed_point

# Max error of an exported step against the fp32 PyTorch step, relative to the output's largest magnitude.
# fp32: rounding only. fp16: measured 4e-4 to 6e-4 on the Fashion-MNIST demo model at K = 3 (ORT CPU);
# the bound leaves room for deeper models and longer unrolls.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3}
LOOP_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}  # images after S steps: errors compound through the loop


@attrs.frozen
class OnnxExporter:
    """ONNX with the solver unrolled `iters` times per step; fp16 halves weights and compute (I/O stays fp32)."""

    iters: int = attrs.field(default=3, validator=[v.instance_of(int), v.ge(1)])
    opset: int = attrs.field(default=DEFAULT_OPSET, validator=[v.instance_of(int), v.ge(MIN_OPSET)])
    fp16: bool = attrs.field(default=False, validator=v.instance_of(bool))
    verify: bool = attrs.field(default=True, validator=v.instance_of(bool))
    verify_batches: tuple[int, int] = (1, 3)

    def export(
        self,
        model: Denoiser,
        *,
        solver: Solver | None,
        solver_info: dict[str, Any] | None,
        config: dict[str, Any],
        spec: dict[str, Any],
        source: dict[str, Any],
        out: Path,
        loop: LoopSpec | None = None,
    ) -> dict[str, Any]:
        """Write `out`; `solver_info` ({"name", "options"}) and `source` (checkpoint path, step) go to metadata."""
        fixed_point = is_fixed_point(model)
        if fixed_point and solver is not None and not solver.can_unroll:
            raise UsageError(
                f"solver {type(solver).__name__} cannot be exported: a solver plugin must provide "
                "unrolled(f, z0, *, iters) -> Tensor with a fixed number of evaluations and "
                "ONNX-exportable ops (docs/plugins.md: 'Export contract')"
            )
        dtype = torch.float16 if self.fp16 else torch.float32
        precision = "fp16" if self.fp16 else "fp32"
        reference = model.float().eval()
        traced = copy.deepcopy(reference).to(dtype) if self.fp16 else reference
        module: nn.Module
        ref_module: nn.Module
        if loop is None:
            step = DenoisingStep(traced, solver, self.iters, dtype=dtype)
            module, ref_module = step, DenoisingStep(reference, solver, self.iters)
            names, outputs = input_names(step), output_names(step)
            make_inputs = lambda b, g: example_inputs(model, b, generator=g)  # noqa: E731
            kind, tolerance = "step", TOLERANCE[precision]
        else:
            module, ref_module = (
                self._loop(traced, solver, loop, dtype),
                self._loop(reference, solver, loop, torch.float32),
            )
            shape = (model.in_channels, model.input_size, model.input_size)
            draws = noise_draws(loop.sampler, loop.diffusion, shape)  # a deterministic sampler has no noise input
            names = ["x_T", *(["y"] if model.num_classes else []), *(["noise"] if draws else [])]
            outputs = ["images", "residual"]
            make_inputs = lambda b, g: loop_inputs(model, draws, b, g)  # noqa: E731
            kind, tolerance = "loop", LOOP_TOLERANCE[precision]
        program = trace(
            module.eval(),
            make_inputs(2, torch.Generator().manual_seed(0)),
            names,
            outputs,
            opset=self.opset,
            batch_axis={"noise": 1},
        )
        names = [i.name for i in program.model.graph.inputs]  # the exporter drops inputs the graph never reads
        extra = {
            "precision": precision,
            "fixed_point": fixed_point,
            "base_blocks": model.blocks_per_call(0),
            "tolerance": tolerance,
        }
        if loop is not None:
            extra.update(
                steps=loop.diffusion.num_timesteps,
                iterations=loop.iterations,
                sampling=loop.names,
                timesteps=loop.diffusion.timestep_map.tolist(),  # per respaced index: ints, floats when fractional
                levels=as_sampler(loop.sampler).levels(loop.diffusion),  # per model evaluation, in call order
                draws=draws,
            )
        iters = self.iters if fixed_point and loop is None else 0  # a DiT step has no iterations to unroll
        metadata = export_metadata(
            kind=kind,
            config=config,
            spec=spec,
            iters=iters,
            solver=solver_info if fixed_point else None,
            dtype=precision,
            inputs=names,
            outputs=outputs,
            source=source,
            extra=extra,
        )
        errors: dict[int, dict[str, float]] = {}

        def check(path: Path) -> None:
            if not self.verify:
                return
            session = cpu_session(path)
            for b in self.verify_batches:
                feed = {k: t for k, t in make_inputs(b, torch.Generator().manual_seed(100 + b)).items() if k in names}
                errors[b] = parity(lambda f: session.run(outputs, f), _Named(ref_module, names), feed, outputs)
                worst = max(e for k, e in errors[b].items() if k != "residual")
                if not worst <= tolerance:  # NaN fails too
                    raise FpdmRuntimeError(
                        f"ONNX Runtime disagrees with PyTorch at batch {b}: max relative error "
                        f"{worst:.2e} > {tolerance:.0e} ({precision}); nothing was written"
                    )

        write_onnx(program, out, metadata, check=check)
        return {
            "path": str(out),
            "kind": kind,
            "precision": precision,
            "opset": self.opset,
            "iters": iters if loop is None else loop.iterations,
            "inputs": names,
            "outputs": outputs,
            "bytes": out.stat().st_size,
            "parity": errors,
            "tolerance": tolerance,
        }

    def _loop(self, model: Denoiser, solver: Solver | None, loop: LoopSpec, dtype: torch.dtype) -> SamplingLoop:
        return SamplingLoop(
            model,
            loop.diffusion,
            sampler=loop.sampler,
            solver=solver,
            iterations=loop.iterations,
            reuse=loop.reuse,
            cfg_scale=loop.cfg_scale,
            cfg_channels=loop.cfg_channels,
            guidance_rescale=loop.guidance_rescale,
            clip_x0=loop.clip_x0,
            clip_output=loop.clip_output,
            dtype=dtype,
        )


class _Named(nn.Module):
    """Calls `module` with keyword inputs, passing only the inputs the exported graph kept."""

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.module, self.names = module, names

    def forward(self, **inputs: Tensor) -> Any:
        return self.module(**{k: t for k, t in inputs.items() if k in self.names})


def loop_inputs(model: Denoiser, draws: int, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random inputs of a whole loop: x_T, y (conditional models) and noise, one row per draw (none without)."""
    c, s = model.in_channels, model.input_size
    inputs = {"x_T": torch.randn(batch, c, s, s, generator=generator)}  # (B, C, H, W)
    if model.num_classes:
        inputs["y"] = torch.randint(0, model.num_classes, (batch,), generator=generator)
    if draws:
        inputs["noise"] = torch.randn(draws, batch, c, s, s, generator=generator)  # (D, B, C, H, W)
    return inputs


def cpu_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@hookimpl
def register_exporters(register: Register) -> None:
    register("onnx", OnnxExporter, description="ONNX graph of one denoising step (or the whole loop), solver unrolled")
