"""ONNX export of one denoising step with the fixed-point solver unrolled K times (and of a whole sampling loop).

The step graph takes x_t (B, C, H, W), t (B,) the model timestep (float32: fractional under karras spacing; int64 in
format version 1 files), y (B,) the class (conditional models only), z0 (B, T, D) and use_z0 (B,) (FPDM only: 1
starts the solve from z0, 0 from the pre-layer output, the cold start); it returns pred (B, C_out, H, W), z (B, T,
D) and residual (B,), the relative residual of the last iteration, which is what the PyTorch solver reports. Float
inputs and outputs are fp32 whatever the graph's compute dtype, so one sampler drives fp32 and fp16 graphs alike.
Everything about the model, the solver and the schedule travels in the file's metadata_props (`fpdm.*`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fpdm.diffusion.evaluation import unrolled_call
from fpdm.errors import FpdmRuntimeError, UsageError
from fpdm.interfaces import Denoiser, FixedPointDenoiser, Solver
from fpdm.version import __version__

FORMAT = "fpdm-onnx"
FORMAT_VERSION = 2  # bump when inputs, outputs or metadata change meaning; readers refuse newer files
# What this version changed from the one before, written into every file (`fpdm.format_changes`) for whoever holds
# files of both. Older versions still load: `fpdm.export.ort` reads each one's inputs as that version declared them.
FORMAT_CHANGES = (
    "2: step input t is float32, so fractional model timesteps (karras spacing) reach the model (1: int64); a "
    "whole loop's noise input holds one row per noise draw its sampler makes (1: one per step), its metadata adds "
    "levels (the respaced index of every model evaluation) and draws, and its timesteps are floats when fractional"
)
MIN_OPSET, DEFAULT_OPSET = 18, 20
TWO_GB = 2 * 1024**3


class DenoisingStep(nn.Module):
    """One denoising step as a traceable module (see the module docstring for its inputs and outputs)."""

    def __init__(
        self, model: Denoiser, solver: Solver | None, iters: int, *, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.model, self.solver, self.iters, self.dtype = model, solver, iters, dtype
        self.fixed_point = isinstance(model, FixedPointDenoiser)
        if self.fixed_point and (solver is None or iters < 1):
            raise UsageError("an FPDM step needs a solver and iters >= 1")

    def forward(
        self, x_t: Tensor, t: Tensor, y: Tensor | None = None, z0: Tensor | None = None, use_z0: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        pred, z, residual = unrolled_call(
            self.model, x_t.to(self.dtype), t, y, solver=self.solver, iters=self.iters, z0=z0, use_z0=use_z0
        )
        if z is None or residual is None:
            return (pred.float(),)
        return pred.float(), z.float(), residual


def input_names(step: DenoisingStep) -> list[str]:
    conditional = bool(getattr(step.model, "num_classes", 0))
    return ["x_t", "t", *(["y"] if conditional else []), *(["z0", "use_z0"] if step.fixed_point else [])]


def output_names(step: DenoisingStep) -> list[str]:
    return ["pred", "z", "residual"] if step.fixed_point else ["pred"]


def example_inputs(
    model: Denoiser, batch: int, *, num_timesteps: int = 1000, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Random inputs of every kind the step takes, for tracing and parity checks; t (B,) float32 fractional
    timesteps in [0, num_timesteps - 1], what the graph's t input declares."""
    g = generator or torch.Generator().manual_seed(0)
    c, s = model.in_channels, model.input_size
    inputs = {
        "x_t": torch.randn(batch, c, s, s, generator=g),
        "t": torch.rand(batch, generator=g) * (num_timesteps - 1),
    }
    if model.num_classes:
        inputs["y"] = torch.randint(0, model.num_classes + 1, (batch,), generator=g)  # the null label too
    if isinstance(model, FixedPointDenoiser):
        with torch.no_grad():  # the state's shape (B, T, D) is the cold start's, whatever the architecture
            start = model.prepare(inputs["x_t"], inputs["t"], inputs.get("y")).start
        inputs["z0"] = torch.randn(start.shape, generator=g)
        inputs["use_z0"] = (torch.rand(batch, generator=g) < 0.5).float()
    return inputs


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress and warnings meant for its developers; fpdm reports what matters."""
    import contextlib
    import io
    import logging

    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def trace(
    module: nn.Module,
    inputs: dict[str, Tensor],
    names: list[str],
    outputs: list[str],
    *,
    opset: int,
    batch_axis: dict[str, int] | None = None,
) -> Any:
    """torch.onnx.export (dynamo) with a dynamic batch axis on every input (axis 0 unless `batch_axis` says
    otherwise); checks that the opset it wrote is the one asked for (it silently falls back otherwise)."""
    batch = torch.export.Dim("batch", min=1)
    dynamic = {name: {(batch_axis or {}).get(name, 0): batch} for name in names}
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                (),
                kwargs=inputs,
                dynamo=True,
                input_names=names,
                output_names=outputs,
                dynamic_shapes=dynamic,
                opset_version=opset,
            )
    except Exception as exc:  # the exporter raises many types; the user gets one line with the cause
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()[0]
        raise FpdmRuntimeError(f"ONNX export failed: {type(exc).__name__}: {first}") from exc
    if program is None:  # torch returns None only for the legacy TorchScript path, never with dynamo=True
        raise FpdmRuntimeError("ONNX export failed: the exporter returned no program")
    got = program.model.opset_imports.get("", None)
    if got != opset:
        raise UsageError(
            f"the exporter cannot write opset {opset} (it produced {got}); "
            f"choose one it can write (default {DEFAULT_OPSET})"
        )
    return program


def write_onnx(
    program: Any, path: Path, metadata: dict[str, str], *, check: Callable[[Path], None] | None = None
) -> None:
    """Save next to `path` under a temporary name, run onnx.checker and `check` on it, then rename: never a
    half-written .onnx. One file below 2 GB; above, the protobuf limit forces an external-data file beside it."""
    import onnx

    program.model.metadata_props.update(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
        external = size >= TWO_GB
        target = tmp / path.name
        program.save(str(target), external_data=external)
        onnx.checker.check_model(str(target) if external else onnx.load(str(target)), full_check=False)
        if check is not None:
            check(target)
        for produced in sorted(tmp.iterdir()):
            os.replace(produced, path.parent / produced.name)
    except onnx.checker.ValidationError as exc:
        raise FpdmRuntimeError(f"onnx.checker rejected the exported graph: {str(exc).splitlines()[0]}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The fpdm metadata of an exported file, JSON values decoded; a clear error for anything else."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such ONNX file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf raises DecodeError and friends
        raise UsageError(f"{path} is not a readable ONNX model") from None
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("fpdm.format") != FORMAT:
        raise UsageError(f"{path} has no fpdm metadata: export it with `fpdm export CKPT --onnx`")
    version = props.get("fpdm.format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise UsageError(
            f"{path} has fpdm ONNX format version {version or '?'}; this fpdm reads up to "
            f"{FORMAT_VERSION}: upgrade fpdm or re-export the checkpoint"
        )
    meta: dict[str, Any] = {}
    for key, value in props.items():
        if key.startswith("fpdm."):
            name = key[len("fpdm.") :]
            try:
                plain = name in ("format", "version", "format_version", "format_changes")
                meta[name] = value if plain else json.loads(value)
            except json.JSONDecodeError:
                raise UsageError(f"{path}: metadata {key} is not valid JSON; re-export the checkpoint") from None
    # Every reader needs these; a file missing one (hand-edited, another tool's) is refused here, not deep inside.
    missing = [f"fpdm.{k}" for k in ("kind", "config", "spec", "iters", "inputs", "outputs") if k not in meta]
    if missing:
        raise UsageError(f"{path}: fpdm metadata lacks {', '.join(missing)}; re-export the checkpoint")
    if isinstance(meta.get("sampling"), dict):  # a whole loop exported before spacings were recorded: the default
        meta["sampling"].setdefault("spacing", "official")
    return meta


def parity(
    session_run: Callable[[dict[str, Any]], list[Any]], module: nn.Module, inputs: dict[str, Tensor], outputs: list[str]
) -> dict[str, float]:
    """Max error of each ONNX output against PyTorch, relative to the output's largest magnitude."""
    with torch.no_grad():
        expected = module(**inputs)
    got = session_run({k: v.numpy() for k, v in inputs.items()})
    errors = {}
    for name, want, have in zip(outputs, expected, got):
        want = want.float()
        have_t = torch.from_numpy(have).float()
        if name == "residual":  # a ratio already: compare absolutely, NaN where PyTorch has NaN
            errors[name] = (have_t - want).abs().nan_to_num(0.0).max().item()
        else:
            errors[name] = ((have_t - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    return errors


def export_metadata(
    *,
    kind: str,
    config: dict[str, Any],
    spec: dict[str, Any],
    iters: int,
    solver: dict[str, Any] | None,
    dtype: str,
    inputs: list[str],
    outputs: list[str],
    source: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    values: dict[str, Any] = {
        "kind": kind,
        "config": config,
        "spec": spec,
        "iters": iters,
        "solver": solver,
        "schedule": config.get("diffusion", {}),
        "dtype": dtype,
        "inputs": inputs,
        "outputs": outputs,
        "source": source,
        **(extra or {}),
    }
    return {
        "fpdm.format": FORMAT,
        "fpdm.format_version": str(FORMAT_VERSION),
        "fpdm.format_changes": FORMAT_CHANGES,
        "fpdm.version": __version__,
        **{f"fpdm.{k}": json.dumps(v) for k, v in values.items()},
    }
