"""CUDA behaviour (marked gpu: skipped without CUDA, run by benchmarks/gpu_check.py's tests part) and the CPU
rehearsal of benchmarks/gpu_check.py itself, so the script that validates a GPU cannot rot between GPU runs."""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import fpdm
from fpdm.export.exporter import TOLERANCE, OnnxExporter
from fpdm.export.onnx import example_inputs
from fpdm.interfaces import Denoiser
from fpdm.plugins.solvers import FixedPointIteration
from fpdm.testing.exporters import tiny_models
from support import REGISTRY, ROOT, SOLVER_NAMES

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
# what the ORT side reads from an export's spec options instead of a module
FACTS = ("input_size", "in_channels", "patch_size", "hidden_size", "num_heads", "num_classes", "learn_sigma")


@pytest.fixture
def exact_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 on the card as on the CPU: no TF32 matmuls or convolutions for this test."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max error relative to the reference's largest magnitude."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def tiny_inputs(model: Denoiser, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = example_inputs(model, batch, generator=torch.Generator().manual_seed(1))
    return x["x_t"], x["t"], x.get("y")


def count_syncs(fn: Callable[[], object]) -> int:
    """Host-device synchronisations while `fn` runs, as torch's sync debug mode reports them (one warning each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


# ------------------------------------------------------------------------------------------------ on CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["FPDM", "DiT"])
def test_denoiser_on_cuda_matches_the_cpu(arch: str, exact_cuda: None) -> None:
    model = tiny_models()[arch]
    x, t, y = tiny_inputs(model)
    solver = FixedPointIteration()
    with torch.no_grad():
        want = model(x, t, y, iters=6, solver=solver)
        got = copy.deepcopy(model).cuda()(x.cuda(), t.cuda(), y.cuda(), iters=6, solver=solver)
    assert got.pred.device.type == "cuda"
    assert relative_error(got.pred, want.pred) < 1e-4
    if want.z is not None:
        assert relative_error(got.z, want.z) < 1e-4
    assert torch.equal(got.blocks.cpu(), want.blocks)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_few_sampling_steps_on_cuda_match_the_cpu(trained: Path, sampler: str, exact_cuda: None) -> None:
    """Same seeds, same noise (drawn on the CPU per sample), same images within fp32 rounding."""
    outs = [
        fpdm.load(trained, device=device).sample(n=4, steps=3, sampler=sampler, seed=0, batch_size=4)
        for device in ("cpu", "cuda")
    ]
    cpu, cuda = outs
    assert cuda.plan["device"].startswith("cuda")
    assert (cuda.images - cpu.images).abs().max().item() < 1e-3
    assert torch.equal(cuda.blocks, cpu.blocks)


@pytest.mark.gpu
def test_onnx_runtime_really_runs_the_step_on_cuda(tmp_path: Path) -> None:
    """ONNX Runtime falls back to the CPU silently: the session's providers must name CUDA, and IO binding must
    leave the outputs on the card."""
    pytest.importorskip("onnxruntime")
    from fpdm.export.ort import OrtDenoiser, OrtSession

    model, path = tiny_models()["FPDM"], tmp_path / "step.onnx"
    solver = FixedPointIteration()
    OnnxExporter(iters=3).export(
        model,
        solver=solver,
        solver_info={"name": "fixed_point", "options": {}},
        config={},
        spec={"denoiser": "fpdm", "options": {name: getattr(model, name) for name in FACTS}},
        source={"test": True},
        out=path,
    )
    session = OrtSession(path, provider="cuda")
    assert session.session.get_providers()[0] == "CUDAExecutionProvider"
    x = example_inputs(model, 3)
    with torch.no_grad():
        want = model(x["x_t"], x["t"], x["y"], z0=x["z0"], iters=3, solver=solver)
    got = OrtDenoiser(session)(x["x_t"].cuda(), x["t"].cuda(), x["y"].cuda(), z0=x["z0"].cuda(), iters=3)
    assert got.pred.device.type == "cuda"
    # ORT's CUDA provider may multiply in TF32, which rounds inputs like fp16: the fp16 bound applies
    assert relative_error(got.pred, want.pred) < TOLERANCE["fp16"]


@pytest.mark.gpu
@pytest.mark.parametrize("solver_name", SOLVER_NAMES)
@pytest.mark.parametrize("tol", [0.0, 1e-3])
def test_a_bf16_solve_stays_finite(solver_name: str, tol: float) -> None:
    model = tiny_models()["FPDM"].cuda()
    x, t, y = (v.cuda() for v in tiny_inputs(model, batch=8))
    solver = REGISTRY.create("solver", solver_name)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, y, iters=40, solver=solver, tol=tol)
    assert out.stats is not None
    assert torch.isfinite(out.pred).all() and torch.isfinite(out.z).all()
    assert torch.isfinite(out.stats.residual).all()


@pytest.mark.gpu
@pytest.mark.parametrize("solver_name", SOLVER_NAMES)
def test_no_host_sync_per_fixed_point_iteration(solver_name: str) -> None:
    """A fixed count never asks the host anything; a tolerance asks once per check_every iterations."""
    model = tiny_models()["FPDM"].cuda()
    x, t, y = (v.cuda() for v in tiny_inputs(model, batch=8))
    solver = REGISTRY.create("solver", solver_name)
    assert count_syncs(lambda: x.sum().item()) >= 1  # the counter sees a sync when there is one
    with torch.no_grad():
        problem = model.prepare(x, t, y)
        z0 = problem.start

        def solve(max_iter: int, tol: float = 0.0, check_every: int = 1) -> Callable[[], object]:
            return lambda: solver.solve(problem.f, z0, max_iter=max_iter, tol=tol, check_every=check_every)

        assert count_syncs(solve(4)) == count_syncs(solve(16)) == 0
        assert count_syncs(solve(16, tol=1e-12, check_every=4)) <= 16 // 4
        short, long = (count_syncs(lambda k=k: model(x, t, y, iters=k, solver=solver)) for k in (4, 16))
    assert short == long


# ------------------------------------------------------------------------------------------------ the script
@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """benchmarks/gpu_check.py imported as a script imports its siblings (its folder first on the path)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_check")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def read_results(out: Path) -> dict[str, Any]:
    return json.loads((out / "gpu_check_rehearsal.json").read_text())


@pytest.mark.slow
def test_gpu_check_rehearses_every_part_on_the_cpu(tmp_path: Path, gpu_check: types.ModuleType) -> None:
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    proc = run_script("--rehearse", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("no CUDA: rehearsing") and all(name in first for name in gpu_check.PARTS)
    results = read_results(tmp_path)
    assert results["rehearsal"] is True
    assert {name: r["status"] for name, r in results["parts"].items()} == dict.fromkeys(gpu_check.PARTS, "ok")
    demo = results["parts"]["demo"]["result"]
    assert demo["best"] is not None and "fresh" in demo["model"]
    assert results["parts"]["nccl"]["result"]["backend"] == "gloo"
    assert "| part | claim |" in (tmp_path / "gpu_check_rehearsal.md").read_text()
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs  # a rehearsal never writes docs


@pytest.mark.slow
def test_a_failing_part_is_recorded_the_rest_run_and_only_reruns_merge(tmp_path: Path) -> None:
    proc = run_script("--rehearse", "--only", "demo,forward", "--run", str(tmp_path / "gone"), "--out", str(tmp_path))
    assert proc.returncode == 1
    parts = read_results(tmp_path)["parts"]
    assert parts["demo"]["status"] == "failed" and "model not found" in parts["demo"]["error"]
    assert parts["forward"]["status"] == "ok"
    assert run_script("--rehearse", "--only", "forward", "--out", str(tmp_path)).returncode == 1  # demo still failed
    assert read_results(tmp_path)["parts"]["demo"]["status"] == "failed"


@pytest.mark.slow
def test_a_part_over_its_cap_is_killed_and_recorded(tmp_path: Path) -> None:
    proc = run_script("--rehearse", "--only", "forward", "--cap", "0.5", "--out", str(tmp_path))
    assert proc.returncode == 1
    record = read_results(tmp_path)["parts"]["forward"]
    assert record["status"] == "timeout" and record["seconds"] < 30


def test_an_unknown_part_is_one_line_naming_the_parts(gpu_check: types.ModuleType) -> None:
    with pytest.raises(SystemExit, match="unknown part 'nope'; the parts are tests, train-fpdm"):
        gpu_check.selected("tests,nope")
    assert gpu_check.selected("ort, nccl") == ["ort", "nccl"]


def gpu_results(*, compile_ms: float, ort_ms: float, fpdm_gib: float, dit_gib: float) -> dict[str, Any]:
    """A GPU run's results as the parts write them, reduced to what the table reads."""

    def run(arch: str, ckpt: bool, gib: float) -> dict[str, Any]:
        return {
            "arch": arch,
            "checkpointing": ckpt,
            "batch": 64,
            "precision": "bf16 autocast",
            "img_per_s": 500.0,
            "peak_mem_gib": gib,
        }

    def ok(result: dict[str, Any]) -> dict[str, Any]:
        return {"status": "ok", "seconds": 1.0, "result": result}

    forward = {
        "arch": "FPDM-XL/2",
        "batch": 64,
        "precision": "bf16 autocast",
        "compile": "per DiTBlock",
        "rows": [{"mode": "compile", "iters": 26, "ms": compile_ms, "first_call_s": 20.0}],
    }
    ort = {
        "arch": "FPDM-XL/2",
        "iters": 26,
        "batch": 64,
        "onnxruntime": "1.31.1",
        "onnxruntime_path": "/x",
        "export_s": 20.0,
        "onnx_mib": 170.0,
        "torch_eager_ms": 60.0,
        "torch_eager_precision": "bf16 autocast",
        "rows": [
            {
                "cuda_graphs": False,
                "provider": "CUDAExecutionProvider",
                "io_binding": True,
                "ms": ort_ms,
                "max_rel_err_vs_torch_fp32": 1e-3,
            },
            {"cuda_graphs": True, "error": "Fail: a node runs on the CPU"},
        ],
    }
    return {
        "command": "python benchmarks/gpu_check.py",
        "rehearsal": False,
        "machine": {"card": "NVIDIA H200", "gpus": 1, "cuda": "13.0", "torch": "2.11.0", "python": "3.12.3"},
        "parts": {
            "train-fpdm": ok({"runs": [run("FPDM-XL/2", False, fpdm_gib)]}),
            "train-dit": ok({"runs": [run("DiT-XL/2", False, dit_gib)]}),
            "forward": ok(forward),
            "ort": ok(ort),
            "nccl": {"status": "timeout", "seconds": 60.0, "error": "still running after 60 s: killed"},
        },
    }


def verdicts(table: str) -> dict[str, str]:
    """claim -> verdict, from the markdown table."""
    cells = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return {row[1]: row[-1].rstrip(" |") for row in cells[1:]}


def test_the_table_judges_each_claim_against_its_target(gpu_check: types.ModuleType) -> None:
    claims = {name: part.claim for name, part in gpu_check.PARTS.items()}
    met = verdicts(gpu_check.markdown(gpu_results(compile_ms=38.0, ort_ms=41.0, fpdm_gib=14.0, dit_gib=35.0), claims))
    assert met["FPDM-XL/2 forward, batch 64, 26 iterations, compile, bf16 autocast"] == "met"  # 38 <= 40 ms
    assert met["ONNX Runtime FPDM-XL/2 step, K=26, batch 64, fp16, CUDAExecutionProvider, IO binding"] == "met"
    assert met["ONNX Runtime FPDM-XL/2 step, K=26, CUDA graphs"] == "failed"  # one session's error, one row
    assert met["FPDM-XL/2 needs less training memory than DiT-XL/2, checkpointing off"] == "holds"  # 60% less
    assert met["1-process torchrun, NCCL"] == "timeout"
    missed = verdicts(
        gpu_check.markdown(gpu_results(compile_ms=45.0, ort_ms=50.0, fpdm_gib=20.0, dit_gib=35.0), claims)
    )
    assert missed["FPDM-XL/2 forward, batch 64, 26 iterations, compile, bf16 autocast"] == "missed"
    assert missed["ONNX Runtime FPDM-XL/2 step, K=26, batch 64, fp16, CUDAExecutionProvider, IO binding"] == "missed"
    assert missed["FPDM-XL/2 needs less training memory than DiT-XL/2, checkpointing off"] == "does not hold"


def test_a_rehearsal_table_gives_no_verdicts(gpu_check: types.ModuleType) -> None:
    results = {**gpu_results(compile_ms=38.0, ort_ms=41.0, fpdm_gib=14.0, dit_gib=35.0), "rehearsal": True}
    results["machine"] = {**results["machine"], "cpu": "x86_64, 2 cores"}
    table = gpu_check.markdown(results, {name: part.claim for name, part in gpu_check.PARTS.items()})
    assert table.startswith("Rehearsal on x86_64, 2 cores without CUDA")
    assert set(verdicts(table).values()) == {"-"}


def test_report_renders_a_saved_run_again_and_runs_nothing(tmp_path: Path, gpu_check: types.ModuleType) -> None:
    saved = tmp_path / "gpu_check.json"
    saved.write_text(json.dumps(gpu_results(compile_ms=38.0, ort_ms=41.0, fpdm_gib=14.0, dit_gib=35.0)))
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert gpu_check.main(["--report", str(saved), "--no-docs"]) == 1  # the saved run's nccl part timed out
    assert (tmp_path / "gpu_check.md").read_text().startswith("Card: NVIDIA H200 (1 visible)")
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs


def test_the_docs_page_has_the_gpu_check_markers_once() -> None:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert text.count("<!-- bench:gpu_check -->") == text.count("<!-- /bench:gpu_check -->") == 1
