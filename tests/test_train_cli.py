"""`fpdm train`, `fpdm eval` and `fpdm encode` flags: one spelling per concept, `--plugin` kept as the card's
synonym of `--solver`, and command modules whose top level does not import torch."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from fpdm.apps.cli import build_parser, command_parsers
from support import ROOT


@pytest.fixture(scope="module")
def parsers() -> dict:  # type: ignore[type-arg]
    return command_parsers(build_parser())


def test_train_solver_and_its_documented_synonym_plugin(parsers: dict, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[type-arg]
    parser = parsers["train"]
    assert parser.parse_args(["--plugin", "anderson"]).solver == "anderson"
    assert parser.parse_args(["--solver", "anderson"]).solver == "anderson"
    assert capsys.readouterr().err == ""  # a synonym, not a deprecation
    text = parser.format_help()
    assert "--plugin NAME" in text and "--solver NAME" in text and "--no-progress" in text
    args = parser.parse_args(["--batch-size", "8", "--seed", "3", "--steps", "2"])
    assert (args.batch_size, args.seed, args.steps, args.device) == (8, 3, 2, None)


def test_train_shortcuts_become_config_overrides(
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
    parsers: dict,
    capsys: pytest.CaptureFixture[str],
) -> None:  # type: ignore[type-arg]
    """--solver/--plugin, --batch-size, --seed and --out land in the config `fpdm.train` receives."""
    import fpdm.training.loop as loop

    seen = []

    def fake_train(config, *, resume, progress):  # type: ignore[no-untyped-def]
        seen.append((config, resume, progress))
        return SimpleNamespace(history=[], checkpoint="ckpt")

    monkeypatch.setattr(loop, "train", fake_train)
    args = parsers["train"].parse_args(
        ["--plugin", "anderson", "--batch-size", "8", "--seed", "5", "--no-progress", "--out", str(tmp_path / "run")]
    )
    assert args._run(args) == 0
    config, resume, progress = seen[0]
    assert config.solver.name == "anderson" and config.train.batch_size == 8 and config.train.seed == 5
    assert config.train.out_dir == str(tmp_path / "run") and not resume and not progress
    assert "solver anderson" in capsys.readouterr().out


def test_eval_flags_follow_the_scheme(parsers: dict, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[type-arg]
    parser = parsers["eval"]
    args = parser.parse_args(["samples"])
    assert (args.n, args.batch_size, args.iters, args.seed, args.weights, args.device, args.json) == (
        None,
        64,
        None,
        0,
        "ema",
        "auto",
        None,
    )
    assert parser.parse_args(["samples", "--json", "out.json"]).json == "out.json"
    assert parser.parse_args(["--json", "-", "samples"]).json == "-"
    capsys.readouterr()
    assert parser.parse_args(["samples", "--no-ema"]).weights == "raw"
    assert capsys.readouterr().err.strip().splitlines() == ["fpdm: --no-ema is deprecated; use --weights raw"]
    text = parser.format_help()
    assert "--weights" in text and "--ema" not in text and "(default: 64)" in text


def test_command_modules_import_without_torch() -> None:
    code = (
        "import sys, argparse\n"
        "from fpdm.apps.eval_cmd import eval_command\n"
        "from fpdm.apps.encode_cmd import encode_command\n"
        "from fpdm.apps.train_cmd import train_command\n"
        "for factory in (eval_command, encode_command, train_command):\n"
        "    factory(argparse.ArgumentParser())\n"
        "print(sorted(m for m in ('torch', 'numpy', 'torch_fidelity') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_train_prints_each_record_with_its_gradient_norm_and_plots_one_point(
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
    parsers: dict,  # type: ignore[type-arg]
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A run short enough to log once still gets its summary line and a loss.png."""
    import fpdm.training.loop as loop

    record = {
        "step": 1,
        "loss": 0.25,
        "grad_norm": 3.0,
        "clipped": 1.0,
        "clip_scale": 0.5,
        "lr": 2e-4,
        "img_per_s": 8.0,
    }

    def fake_train(config, *, resume, progress):  # type: ignore[no-untyped-def]
        return SimpleNamespace(history=[record], checkpoint="ckpt")

    monkeypatch.setattr(loop, "train", fake_train)
    args = parsers["train"].parse_args(["--no-progress", "--out", str(tmp_path / "run")])
    (tmp_path / "run").mkdir()
    assert args._run(args) == 0
    out = capsys.readouterr().out
    assert "step       1  loss 0.2500  grad norm 3 (clipped 100%, x0.50)  lr 0.0002  8 img/s" in out
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
