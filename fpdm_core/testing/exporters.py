"""The exporter contract, for exporters of fpdm's ONNX step format (the `register_exporters` hook).

An exporter is built by `make(**options)` and called as
`export(model, *, solver, solver_info, config, spec, source, out) -> report` (a dict holding at least
"path" and "iters"). The suite exports a tiny FPDM and a tiny DiT (fpdm's own models) with a solver that
unrolls, and runs the written file in onnxruntime: inputs x_t (B, C, H, W), t (B,), y (B,), and for
fixed-point models z0 (B, T, D) and use_z0 (B,); output `pred`. Without onnxruntime (or onnx) the
contracts that need them are skipped, not failed.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fpdm.config import Config, to_dict
from fpdm.errors import UsageError
from fpdm.interfaces import Denoiser, FixedPointDenoiser, Solver, SolverResult
from fpdm.models.transformer import FPDM, DiT
from fpdm.testing.denoisers import Iterate, build
from fpdm.testing.suite import Make, skip

TOLERANCE = 1e-3  # max error relative to the largest |pred|: fp32 graphs differ from eager by rounding only


def tiny_models() -> dict[str, Denoiser]:
    """A class-conditional FPDM and DiT on 8x8 single-channel images, hidden size 32."""
    small: dict[str, Any] = {
        "input_size": 8,
        "in_channels": 1,
        "patch_size": 2,
        "hidden_size": 32,
        "num_heads": 2,
        "num_classes": 3,
    }
    return {"FPDM": build(lambda: FPDM(**small)), "DiT": build(lambda: DiT(depth=2, **small))}


def _needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        skip(f"needs {', '.join(missing)}")


def export(make: Make, model: Denoiser, out: Path, *, solver: Solver | None = None) -> dict[str, Any]:
    spec = {"denoiser": type(model).__name__.lower(), "options": {}, "class_names": ["a", "b", "c"]}
    report = make().export(
        model,
        solver=solver or Iterate(),
        solver_info={"name": "iterate", "options": {}},
        config=to_dict(Config()),
        spec=spec,
        source={"checkpoint": "fpdm.testing", "step": 0},
        out=out,
    )
    assert isinstance(report, dict), f"export returned {type(report).__name__}, not a report dict"
    return report


def _feed(session: Any, model: Denoiser, batch: int, seed: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    s, c = model.input_size, model.in_channels
    values: dict[str, Tensor] = {
        "x_t": torch.randn(batch, c, s, s, generator=gen),
        "t": torch.randint(0, 1000, (batch,), generator=gen),
        "y": torch.randint(0, model.num_classes + 1, (batch,), generator=gen),
    }
    if isinstance(model, FixedPointDenoiser):
        with torch.no_grad():
            start = model.prepare(values["x_t"], values["t"], values["y"]).start
        values["z0"] = start + 0.1 * torch.randn(start.shape, generator=gen)
        values["use_z0"] = torch.arange(batch, dtype=torch.float32) % 2  # warm and cold rows in one batch
    # Each input in the dtype the file declares (fpdm's format 2 takes float32 timesteps, format 1 int64).
    declared = {i.name: i.type for i in session.get_inputs()}
    feed = {k: values[k].float() if declared[k] == "tensor(float)" else values[k] for k in declared}
    return {k: v.numpy() for k, v in feed.items()}, values


def _reference(model: Denoiser, values: dict[str, Tensor], iters: int) -> Tensor:
    x, t, y = values["x_t"], values["t"], values["y"]
    with torch.no_grad():
        if not isinstance(model, FixedPointDenoiser):
            return model(x, t, y, iters=0).pred
        rows = []
        for b in range(x.shape[0]):  # each row from its own start: z0 where use_z0 is 1, cold otherwise
            one = slice(b, b + 1)
            z0 = values["z0"][one] if values["use_z0"][b] > 0 else None
            rows.append(model(x[one], t[one], y[one], z0=z0, iters=iters, solver=Iterate()).pred)
        return torch.cat(rows)


def writes_the_out_file_and_reports_it(make: Make) -> None:
    """export writes exactly `out` (no temporary files left beside it) and reports its path."""
    _needs("onnx")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "models" / "step.onnx"
        report = export(make, tiny_models()["FPDM"], out)
        assert out.is_file() and out.stat().st_size > 0, f"{out} was not written"
        assert Path(report.get("path", "")) == out, f"the report names {report.get('path')!r}, not {out}"
        assert sorted(p.name for p in out.parent.iterdir()) == ["step.onnx"], list(out.parent.iterdir())


def exported_step_reproduces_the_denoiser(make: Make) -> None:
    """onnxruntime on the written file gives the PyTorch step's pred (FPDM: `iters` unrolled iterations from
    z0 or the cold start, row by row) at batch 1 and 3, within 1e-3 of the largest |pred|."""
    _needs("onnx", "onnxruntime")
    import onnxruntime as ort

    for name, model in tiny_models().items():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "step.onnx"
            report = export(make, model, out)
            iters = int(report.get("iters", 0))
            if isinstance(model, FixedPointDenoiser):
                assert iters >= 1, f"{name}: the report must give the unrolled iterations, got {report.get('iters')}"
            session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            outputs = [o.name for o in session.get_outputs()]
            assert "pred" in outputs, f"{name}: outputs {outputs} lack 'pred'"
            for batch in (1, 3):
                feed, values = _feed(session, model, batch, seed=batch)
                got = torch.from_numpy(session.run(["pred"], feed)[0])
                want = _reference(model, values, iters)
                err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
                assert got.shape == want.shape and err <= TOLERANCE, f"{name} at batch {batch}: error {err:.2e}"


class _NoUnroll(Solver):
    def solve(
        self, f: Any, z0: Tensor, *, max_iter: int | Tensor, tol: float, check_every: int = 1, trace: bool = False
    ) -> SolverResult:
        return Iterate().solve(f, z0, max_iter=max_iter, tol=tol, check_every=check_every, trace=trace)


def refuses_a_solver_that_cannot_unroll(make: Make) -> None:
    """A fixed-point model with a solver lacking `unrolled` is a UsageError that writes nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.onnx"
        try:
            export(make, tiny_models()["FPDM"], out, solver=_NoUnroll())
        except UsageError as exc:
            assert "unroll" in str(exc), f"the error must say the solver cannot be unrolled: {exc}"
        else:
            raise AssertionError("exporting with a solver that cannot unroll must raise UsageError")
        assert not out.exists(), "a refused export wrote a file"


CONTRACTS = (
    writes_the_out_file_and_reports_it,
    exported_step_reproduces_the_denoiser,
    refuses_a_solver_that_cannot_unroll,
)
