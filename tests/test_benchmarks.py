"""The measuring helpers the benchmark scripts share. benchmarks/ holds scripts, not a package: each imports
its siblings as a script does (its folder first on the path), so the tests import them the same way, with the
folder on the path for this module's tests only."""

from __future__ import annotations

import importlib
import json
import types

import pytest
import torch

from fpdm.build import build_denoiser
from fpdm.config import ModelConfig
from support import ROOT

pytestmark = pytest.mark.slow  # each measures real training steps of a model: seconds apiece


@pytest.fixture
def bench(monkeypatch):  # type: ignore[no-untyped-def]
    """import a benchmark script by name, as its siblings import it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module


@pytest.fixture
def train(bench) -> types.ModuleType:  # type: ignore[no-untyped-def]
    return bench("train")


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_denoiser(
        ModelConfig(arch=arch, hidden_size=32, num_heads=2), input_size=8, in_channels=1, num_classes=3
    )


def test_measure_steps_times_each_step_after_warmup_with_seeded_draws(train):
    measure_steps = train.measure_steps
    model = tiny("FPDM-XS/4")
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    first = measure_steps(model, x, y, ranges=([0, 2], [1, 3]), steps=3, warmup=1)
    again = measure_steps(tiny("FPDM-XS/4"), x, y, ranges=([0, 2], [1, 3]), steps=3, warmup=1)
    assert len(first["times"]) == 3 and all(t > 0 for t in first["times"]) and first["peak"] >= 0
    assert first["counts"] == again["counts"]  # every setting sees the same S-JFB sequence
    assert all(0 <= a <= 2 and 1 <= b <= 3 for a, b in first["counts"])


@pytest.mark.parametrize("bf16", [False, True])
def test_saved_bytes_is_affine_in_the_batch_and_grows_with_the_grad_phase(bf16, train):
    saved_bytes = train.saved_bytes
    model = tiny("FPDM-XS/4")

    def kept(batch: int, n_grad: int) -> int:
        return saved_bytes(model, batch, 8, 1, 3, n_no_grad=2, n_grad=n_grad, bf16=bf16)

    one, two, three = kept(1, 2), kept(2, 2), kept(3, 2)
    assert three - two == two - one > 0  # per-sample activations; the rest (bf16 weight copies) is fixed
    assert (2 * one - two == 0) is (not bf16)
    assert kept(2, 3) > kept(2, 2) > kept(2, 1)  # each grad-phase iteration keeps its activations
    assert kept(2, 2) == saved_bytes(model, 2, 8, 1, 3, n_no_grad=0, n_grad=2, bf16=bf16)  # no-grad keeps nothing


def test_bf16_autocast_keeps_fewer_bytes_per_sample_than_fp32(train):
    saved_bytes = train.saved_bytes
    model = tiny("DiT-XS/4")

    def per_sample(bf16: bool) -> int:
        return saved_bytes(model, 3, 8, 1, 3, n_no_grad=0, n_grad=1, bf16=bf16) - saved_bytes(
            model, 2, 8, 1, 3, n_no_grad=0, n_grad=1, bf16=bf16
        )

    assert per_sample(True) < 0.75 * per_sample(False)


def test_paper_claims_measures_apart_without_path_edits(bench, train):
    claims = bench("paper_claims")
    apart = claims.measure_apart("account_memory", "FPDM-XS/4 Fashion-MNIST", 2, False, False)
    assert apart == train.account_memory("FPDM-XS/4 Fashion-MNIST", 2, False, False)  # exact accounting, any process
    with pytest.raises(SystemExit, match="--apart runs one of run_one, account_memory"):
        claims.run_apart('["saved_bytes", []]')


def test_quality_per_compute_quick_run_writes_its_cells_and_table(images, tmp_path):
    """The benchmark's --quick smoke run on a tiny 32x32 model: every cell measured, the table written, and a
    rerun with the same settings measures nothing again."""
    import subprocess
    import sys

    from fpdm.training.loop import train as train_run
    from support import tiny_config

    run = tmp_path / "run"
    train_run(tiny_config(images, run, "data.image_size=32", "train.steps=2"), progress=False)
    command = [sys.executable, str(ROOT / "benchmarks" / "quality_per_compute.py"), "--quick", "--run", str(run)]
    done = subprocess.run([*command, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "quality_per_compute.json").read_text())
    assert sorted(results["cells"]) == [
        "evals|5|ddim",
        "evals|5|ddim trailing",
        "evals|5|euler",
        "iters|ddim|1",
        "iters|ddim|2",
    ]
    cell = results["cells"]["iters|ddim|1"]
    assert cell["evaluations"] == 10 and len(cell["residual_per_evaluation"]) == 10 and cell["fid"] >= 0
    assert (tmp_path / "out" / "quality_per_compute.md").read_text().startswith("FPDM-XS/2 at step 2")
    again = subprocess.run([*command, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert (
        again.returncode == 0
        and json.loads((tmp_path / "out" / "quality_per_compute.json").read_text())["cells"] == results["cells"]
    )
