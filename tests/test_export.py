"""ONNX export with the solver unrolled, and the ONNX Runtime sampler: parity with PyTorch, graph growth in K,
metadata, whole-loop export, and every bad input the issue names (one line, non-zero exit, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fpdm.build import load_denoiser
from fpdm.errors import FpdmRuntimeError, UsageError
from fpdm.interfaces import Solver, SolverResult
from fpdm.io.checkpoint import load_checkpoint
from support import REGISTRY, run_cli, tiny_config

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fpdm.export import exporter as exporter_module  # noqa: E402
from fpdm.export.exporter import LoopSpec, OnnxExporter  # noqa: E402
from fpdm.export.onnx import FORMAT_VERSION, example_inputs, read_metadata  # noqa: E402
from fpdm.export.ort import OrtDenoiser, OrtLoop, OrtSession  # noqa: E402


def _export(
    run: Path, out: Path, *, solver: str = "fixed_point", iters: int = 3, loop: LoopSpec | None = None, **options
) -> dict:  # type: ignore[no-untyped-def]
    ckpt = load_checkpoint(run)
    model = load_denoiser(ckpt, registry=REGISTRY)
    return OnnxExporter(iters=iters, **options).export(
        model,
        solver=REGISTRY.create("solver", solver),
        solver_info={"name": solver, "options": {}},
        config=ckpt.config,
        spec=ckpt.spec,
        source={"checkpoint": str(ckpt.path), "step": ckpt.step},
        out=out,
        loop=loop,
    )


@pytest.fixture(scope="module")
def dit_run(images, tmp_path_factory):  # type: ignore[no-untyped-def]
    from fpdm.training.loop import train

    out = tmp_path_factory.mktemp("dit") / "run"
    train(
        tiny_config(images, out, "model.arch=DiT-XS/2", "model.depth=2", "train.steps=3"),
        registry=REGISTRY,
        progress=False,
    )
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
@pytest.mark.parametrize("iters", [1, 3, 8])
def test_step_graph_matches_the_pytorch_solve(trained, tmp_path, solver, iters):
    """ORT runs the exported step; PyTorch runs the denoiser with the solver's own solve (tol 0, K iterations)."""
    _export(trained, tmp_path / "m.onnx", solver=solver, iters=iters, verify=False)
    model = load_denoiser(load_checkpoint(trained), registry=REGISTRY)
    ort_model = OrtDenoiser(OrtSession(tmp_path / "m.onnx", provider="cpu"))
    inputs = example_inputs(model, 5, generator=torch.Generator().manual_seed(7))
    for z0 in (None, inputs["z0"]):  # cold start, then a reused state
        with torch.no_grad():
            want = model(
                inputs["x_t"], inputs["t"], inputs["y"], z0=z0, iters=iters, solver=REGISTRY.create("solver", solver)
            )
        got = ort_model(inputs["x_t"], inputs["t"], inputs["y"], z0=z0, iters=iters)
        assert _relative(got.pred, want.pred) <= 1e-4
        assert _relative(got.z, want.z) <= 1e-4
        torch.testing.assert_close(got.stats.residual, want.stats.residual, rtol=1e-3, atol=1e-5)
        assert got.blocks.tolist() == want.blocks.tolist()


@pytest.mark.slow
def test_node_count_grows_linearly_in_k(trained, tmp_path):
    counts = []
    for k in (1, 2, 4):
        _export(trained, tmp_path / f"k{k}.onnx", iters=k, verify=False)
        counts.append(len(onnx.load(str(tmp_path / f"k{k}.onnx")).graph.node))
    per_iteration = counts[1] - counts[0]
    assert per_iteration > 0
    assert counts[2] - counts[1] == 2 * per_iteration  # the same nodes again for every unrolled iteration


@pytest.mark.slow
def test_dit_exports_without_a_state(dit_run, tmp_path):
    report = _export(dit_run, tmp_path / "dit.onnx")
    assert report["inputs"] == ["x_t", "t", "y"] and report["outputs"] == ["pred"]
    assert max(report["parity"][3].values()) <= 1e-4
    model = load_denoiser(load_checkpoint(dit_run), registry=REGISTRY)
    inputs = example_inputs(model, 4)
    got = OrtDenoiser(OrtSession(tmp_path / "dit.onnx", provider="cpu"))(inputs["x_t"], inputs["t"], inputs["y"])
    with torch.no_grad():
        assert _relative(got.pred, model(inputs["x_t"], inputs["t"], inputs["y"]).pred) <= 1e-4
    assert got.z is None and read_metadata(tmp_path / "dit.onnx")["iters"] == 0
    done = run_cli("export", str(dit_run), "--onnx", "--whole-loop", "--steps", "2", "--out", str(tmp_path / "l.onnx"))
    assert done.returncode == 0, done.stderr
    done = run_cli("sample", str(tmp_path / "l.onnx"), "--n", "2", "--no-progress", "--out", str(tmp_path / "s"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "s" / "stats.json").read_text())["blocks_per_sample"]["max"] == 2 * 2  # depth 2


@pytest.mark.slow
def test_metadata_round_trips_and_the_file_is_self_contained(trained, tmp_path):
    report = _export(trained, tmp_path / "m.onnx", solver="anderson", iters=2)
    meta = read_metadata(tmp_path / "m.onnx")
    ckpt = load_checkpoint(trained)
    assert meta["config"] == ckpt.config and meta["spec"] == ckpt.spec
    assert meta["iters"] == 2 and meta["solver"]["name"] == "anderson" and meta["kind"] == "step"
    assert meta["schedule"] == ckpt.config["diffusion"] and meta["format_version"] == str(FORMAT_VERSION)
    assert meta["version"] and meta["inputs"] == report["inputs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no sidecar, no temporary left behind
    for batch, errors in report["parity"].items():
        assert errors["pred"] <= 1e-4 and errors["z"] <= 1e-4, (batch, errors)


@pytest.mark.slow
def test_fp16_export_stays_within_its_documented_bound(trained, tmp_path):
    report = _export(trained, tmp_path / "h.onnx", fp16=True)
    assert report["precision"] == "fp16" and report["tolerance"] == exporter_module.TOLERANCE["fp16"]
    assert all(max(e["pred"], e["z"]) <= report["tolerance"] for e in report["parity"].values())
    fp32 = _export(trained, tmp_path / "f.onnx", verify=False)
    assert (tmp_path / "h.onnx").stat().st_size < 0.8 * fp32["bytes"]  # halved weights; the graph itself is not


def _sampling_options(trained: Path, iters: int):  # type: ignore[no-untyped-def]
    from fpdm.config import Config, SampleConfig, from_dict
    from fpdm.diffusion.plan import sampling_parts

    ckpt = load_checkpoint(trained)
    model = load_denoiser(ckpt, registry=REGISTRY)
    options = SampleConfig(steps=4, sampler="ddpm", reuse="extrapolate", cfg_scale=2.0)
    parts = sampling_parts(from_dict(Config, ckpt.config), model, options, registry=REGISTRY, iters=iters)
    return model, parts


@pytest.mark.slow
def test_ort_sampler_reproduces_pytorch_samples(trained, tmp_path):
    from fpdm.diffusion.sampling import generate

    model, parts = _sampling_options(trained, iters=2)
    _export(trained, tmp_path / "m.onnx", iters=2, verify=False)
    common = dict(
        n=5,
        batch_size=3,
        seed=3,
        labels=[0, 1],
        shape=(1, 8, 8),
        sampler=parts.sampler,
        iterations=parts.iterations,
        reuse=parts.reuse,
        cfg_scale=2.0,
    )
    want = generate(model, parts.diffusion, solver=REGISTRY.create("solver", "fixed_point"), **common)
    got = generate(OrtDenoiser(OrtSession(tmp_path / "m.onnx", provider="cpu")), parts.diffusion, solver=None, **common)
    assert (got.images - want.images).abs().max().item() <= 1e-4
    for a, b in zip(got.steps, want.steps):
        assert a["iterations_mean"] == b["iterations_mean"] == 2
        assert a["residual_mean"] == pytest.approx(b["residual_mean"], rel=1e-3)


@pytest.mark.slow
def test_whole_loop_export_reproduces_pytorch_samples(trained, tmp_path):
    """The exported loop runs the sampler `generate` runs, over the same model evaluation (unrolled)."""
    from fpdm.diffusion.sampling import generate, generate_batches

    model, parts = _sampling_options(trained, iters=2)
    loop = LoopSpec(
        parts.diffusion,
        parts.sampler,
        parts.iterations,
        parts.reuse,
        2.0,
        None,
        False,
        True,
        {"steps": 4, "sampler": "ddpm", "reuse": "extrapolate", "cfg_scale": 2.0},
    )
    report = _export(trained, tmp_path / "loop.onnx", loop=loop)
    assert report["kind"] == "loop" and report["inputs"] == ["x_T", "y", "noise"]
    want = generate(
        model,
        parts.diffusion,
        n=4,
        batch_size=4,
        seed=5,
        labels=[1, 0],
        shape=(1, 8, 8),
        sampler=parts.sampler,
        solver=REGISTRY.create("solver", "fixed_point"),
        iterations=parts.iterations,
        reuse=parts.reuse,
        cfg_scale=2.0,
    )
    ort_loop = OrtLoop(OrtSession(tmp_path / "loop.onnx", provider="cpu"))
    got = generate_batches(ort_loop, n=4, batch_size=4, seed=5, labels=[1, 0])
    assert (got.images - want.images).abs().max().item() <= 1e-3
    assert got.blocks.tolist() == want.blocks.tolist()


@pytest.mark.slow
def test_cli_exports_and_samples_with_onnxruntime(trained, tmp_path):
    out = tmp_path / "m.onnx"
    done = run_cli("export", str(trained), "--onnx", "--iters", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "parity vs PyTorch at batch 1" in done.stdout
    done = run_cli("sample", str(out), "--n", "3", "--steps", "3", "--no-progress", "--out", str(tmp_path / "s"))
    assert done.returncode == 0, done.stderr
    assert "CPUExecutionProvider" in done.stdout
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert stats["provider"] == "CPUExecutionProvider" and stats["iterations_plan"] == [2, 2, 2]
    assert len(list((tmp_path / "s" / "images").iterdir())) == 3


class _OpaqueSolver(Solver):
    """A third-party solver without an unrolled form."""

    def solve(
        self,
        f,
        z0,
        *,
        max_iter,
        tol,
        check_every=1,  # type: ignore[no-untyped-def]
        trace=False,
    ) -> SolverResult:
        raise NotImplementedError


def test_a_solver_without_an_unrolled_form_is_named(trained, tmp_path):
    ckpt = load_checkpoint(trained)
    with pytest.raises(UsageError, match=r"solver _OpaqueSolver cannot be exported: .*unrolled\(f, z0, \*, iters\)"):
        OnnxExporter().export(
            load_denoiser(ckpt, registry=REGISTRY),
            solver=_OpaqueSolver(),
            solver_info=None,
            config=ckpt.config,
            spec=ckpt.spec,
            source={},
            out=tmp_path / "x.onnx",
        )
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_failed_parity_writes_nothing(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(exporter_module.TOLERANCE, "fp32", 0.0)
    monkeypatch.setattr(exporter_module, "parity", lambda *a, **k: {"pred": 1.0, "z": 0.0})
    with pytest.raises(FpdmRuntimeError, match="ONNX Runtime disagrees with PyTorch.*nothing was written"):
        _export(trained, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--onnx", "--iters", "0"], "iters must be >= 1"),
        (["--onnx", "--opset", "12"], "'opset' must be >= 18"),
        (["--onnx", "--opset", "40", "--no-verify"], "cannot write opset 40"),
        (["--iters", "2"], "choose a format"),
        (["--onnx", "--steps", "4"], "only apply to whole_loop"),
        (["--onnx", "--whole-loop"], "whole_loop needs steps"),
        (["--onnx", "--whole-loop", "--steps", "3", "--allocator", "adaptive"], "needs a fixed plan"),
        (["--format", "tensorrt"], "unknown exporter 'tensorrt'"),
        (["--onnx", "--out", "model.bin"], "out must end in .onnx"),
    ],
)
def test_bad_export_arguments_get_one_line(trained, tmp_path, args, message):
    out = [] if "--out" in args else ["--out", str(tmp_path / "m.onnx")]
    done = run_cli("export", str(trained), *args, *out)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_missing_checkpoint_is_one_line(tmp_path):
    done = run_cli("export", str(tmp_path / "nope"), "--onnx")
    assert done.returncode == 2 and "model not found" in done.stderr


@pytest.mark.slow
def test_onnx_without_fpdm_metadata_or_from_a_newer_format_is_refused(trained, tmp_path):
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(2, 2).eval(), (torch.randn(1, 2),), str(plain), dynamo=True)
    done = run_cli("sample", str(plain), "--n", "1")
    assert done.returncode == 2 and "has no fpdm metadata" in done.stderr
    _export(trained, tmp_path / "m.onnx", verify=False)
    model = onnx.load(str(tmp_path / "m.onnx"))
    for prop in model.metadata_props:
        if prop.key == "fpdm.format_version":
            prop.value = str(FORMAT_VERSION + 1)
    onnx.save(model, str(tmp_path / "newer.onnx"))
    done = run_cli("sample", str(tmp_path / "newer.onnx"), "--n", "1")
    assert done.returncode == 2 and f"format version {FORMAT_VERSION + 1}" in done.stderr
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    done = run_cli("sample", str(tmp_path / "junk.onnx"), "--n", "1")
    assert done.returncode == 2 and "not a readable ONNX model" in done.stderr


@pytest.mark.slow
def test_ort_sampler_refuses_what_one_graph_cannot_do(trained, tmp_path):
    _export(trained, tmp_path / "m.onnx", iters=2, verify=False)
    path = str(tmp_path / "m.onnx")
    for args, message in [
        (["--allocator", "increasing", "--budget", "30"], "allocation is fixed"),
        (["--budget", "25"], "the graph runs exactly K=2"),
        (["--tol", "0.01"], "fixed when a graph is exported"),
        (["--backend", "torch"], "samples with --backend onnxruntime"),
        (["--cuda-graph", "--provider", "cpu"], "needs the CUDA provider"),
    ]:
        done = run_cli("sample", path, "--n", "1", "--steps", "5", *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    model = OrtDenoiser(OrtSession(path, provider="cpu"))
    with pytest.raises(UsageError, match=r"input x_t has shape \(2, 1, 16, 16\); the graph expects"):
        model(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), iters=2)
    with pytest.raises(UsageError, match="runs exactly 2 iterations"):
        model(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), iters=3)


@pytest.mark.slow
def test_the_cards_command_names_the_missing_default_run(tmp_path):
    """`fpdm export --onnx --iters 3` (no checkpoint) uses the run `fpdm train` writes; without one, one line."""
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "fpdm.apps.cli", "export", "--onnx", "--iters", "3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "FPDM_LOAD_PLUGINS": ""},
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "fpdm export: error: no checkpoint given and the default run runs/fashion_mnist "
        "has none: train one with `fpdm train` or name a run, checkpoint or .onnx file"
    )
