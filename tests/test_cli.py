"""`fpdm` as a user runs it: in a subprocess, with third-party plugins installed as fake distributions; and the
CLI's own conventions in-process: help text with defaults, deprecated spellings, a start path without torch."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

import fpdm as fpdm_package
from fakedist import fake_dist
from fpdm.apps.cli import (
    HelpFormatter,
    add_json_option,
    add_weights_option,
    build_parser,
    command_parsers,
    deprecated_alias,
    main,
)
from fpdm.registry import Registry, default_registry
from fpdm.version import __version__
from support import EXAMPLE_SRC, ROOT, run_cli

fpdm = run_cli


@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    """The example plugin as pip would leave it: its dist-info with the entry point, its module importable."""
    site = tmp_path_factory.mktemp("site")
    fake_dist(site, "fpdm-plugin-example", "0.1.0", {"barzilai_borwein": "fpdm_plugin_example"})
    return {"PYTHONPATH": os.pathsep.join([str(site), str(EXAMPLE_SRC)]), "FPDM_LOAD_PLUGINS": "fpdm-plugin-example"}


def test_console_script_is_installed():
    assert shutil.which("fpdm") is not None


@pytest.mark.slow
def test_plugins_lists_builtins_as_text_and_json():
    text = fpdm("plugins")
    assert text.returncode == 0, text.stderr
    assert "solvers" in text.stdout and "built-in" in text.stdout and "fixed_point, anderson" in text.stdout
    data = json.loads(fpdm("plugins", "--json").stdout)
    solvers = {
        "name": "solvers",
        "source": "built-in",
        "registered": {"solver": ["fixed_point", "anderson"]},
        "error": None,
    }
    assert solvers in data


@pytest.mark.slow
def test_a_third_party_plugin_is_listed_and_selected_by_name_and_by_config(example_site, tmp_path):
    data = json.loads(fpdm("plugins", "--json", env=example_site).stdout)
    entry = next(d for d in data if d["name"] == "barzilai_borwein")
    assert entry == {
        "name": "barzilai_borwein",
        "source": "fpdm-plugin-example 0.1.0",
        "registered": {"solver": ["barzilai_borwein"]},
        "error": None,
    }

    by_flag = fpdm("solve", "--solver", "barzilai_borwein", "--rate", "0.95", "--json", env=example_site)
    assert by_flag.returncode == 0, by_flag.stderr
    (report,) = json.loads(by_flag.stdout)
    assert report["solver"] == "barzilai_borwein" and report["converged_fraction"] == 1.0
    assert report["error_vs_exact"] < 0.95 / 0.05 * 1e-3 * 1.01

    config = tmp_path / "solver.toml"
    config.write_text('[solver]\nname = "barzilai_borwein"\ntol = 1e-5\n[solver.options]\nmax_step = 20.0\n')
    by_config = fpdm("solve", "--config", str(config), "--json", env=example_site)
    (report,) = json.loads(by_config.stdout)
    assert report["config"]["options"] == {"max_step": 20.0} and report["residual_max"] <= 1e-5

    hidden = fpdm("solve", "--solver", "barzilai_borwein", env={**example_site, "FPDM_LOAD_PLUGINS": ""})
    assert hidden.returncode == 2 and "unknown solver 'barzilai_borwein'; known: anderson, fixed_point" in hidden.stderr


@pytest.mark.slow
def test_a_broken_plugin_never_takes_the_cli_down(tmp_path):
    fake_dist(
        tmp_path,
        "fpdm-broken",
        "0.1",
        {"broken": "fpdm_broken_mod"},
        {"fpdm_broken_mod": "raise RuntimeError('kaput')"},
    )
    env = {"PYTHONPATH": str(tmp_path), "FPDM_LOAD_PLUGINS": "fpdm-broken"}
    listing = fpdm("plugins", env=env)
    assert listing.returncode == 0 and "broken" in listing.stdout
    assert "import failed: RuntimeError: kaput" in listing.stdout
    assert fpdm("solve", "--all", env=env).returncode == 0


@pytest.mark.slow
def test_solve_all_runs_every_registered_solver():
    result = fpdm("solve", "--all", "--rate", "0.9", "--json")
    reports = json.loads(result.stdout)
    assert [r["solver"] for r in reports] == ["anderson", "fixed_point"]
    assert all(r["converged_fraction"] == 1.0 for r in reports)
    assert reports[0]["iterations_max"] < reports[1]["iterations_max"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["solve", "--solver", "nope"], "unknown solver 'nope'; known: anderson, fixed_point"),
        (["solve", "--solver", "anderson", "--set", "solver.options.m=0"], "'m' must be >= 1"),
        (
            ["solve", "--solver", "anderson", "--set", "solver.options.window=3"],
            "has no option 'window'; options: m, beta, lam",
        ),
        (["solve", "--set", "solver.max_iter=-1"], "'max_iter' must be >= 0"),
        (["solve", "--set", "solver.bogus=1"], "unknown key 'solver.bogus'"),
        (["solve", "--set", "nonsense"], "--set expects KEY=VALUE"),
        (["solve", "--config", "/nonexistent.toml"], "config file not found"),
        (["solve", "--rate", "1.5"], "--rate must be in [0, 1)"),
        (["solve", "--batch-size", "0"], "must be >= 1"),
        (["solve", "--rate", "abc"], "invalid float value"),
        (["solve", "--problem", "cubic"], "invalid choice"),
        (["nope"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = fpdm(*args)
    assert result.returncode == 2, result
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_debug_shows_the_traceback():
    result = fpdm("--debug", "solve", "--solver", "nope")
    assert result.returncode != 0 and "Traceback" in result.stderr


# ------------------------------------------------------------------ conventions shared by every command (in-process)
BUILTIN_COMMANDS = Registry.load(only=[]).names("command")
HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "torch_fidelity")


@pytest.fixture
def builtins_only(monkeypatch):
    monkeypatch.setenv("FPDM_LOAD_PLUGINS", "")
    default_registry.cache_clear()
    yield
    default_registry.cache_clear()


def one_text(text: str) -> str:
    return " ".join(text.split())  # argparse wraps help lines


@pytest.mark.parametrize("command", BUILTIN_COMMANDS)
def test_help_of_every_command_gives_every_option_help_and_its_default(command, builtins_only, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = one_text(capsys.readouterr().out)
    assert text.startswith(f"usage: fpdm {command}")
    parser = command_parsers(build_parser(fill_all=True))[command]
    for action in parser._actions:
        if action.help is argparse.SUPPRESS or not action.option_strings:
            continue
        flag = action.option_strings[-1]
        assert action.help, f"fpdm {command} {flag}: no help text"
        flag_pair = action.nargs == 0 and isinstance(action.default, bool)  # on/off flags say no default
        noisy = flag_pair or action.default in (None, argparse.SUPPRESS, [])
        if not noisy and "default" not in action.help.lower():
            assert f"(default: {action.default})" in text, f"fpdm {command} {flag}: default not shown"


def test_the_formatter_shows_defaults_and_hidden_choices_and_skips_noise():
    parser = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    parser.add_argument("--rate", type=float, default=0.5, help="a rate")
    parser.add_argument("--undocumented", type=int, default=3)
    parser.add_argument("--mode", choices=("a", "b"), metavar="M", default="a", help="a mode")
    parser.add_argument("--name", help="no default")
    parser.add_argument("--flag", action="store_true", help="a flag")
    parser.add_argument("--set", action="append", default=[], help="repeatable")
    parser.add_argument("--out", default="x.png", help="where (default: beside the input)")
    text = one_text(parser.format_help())
    assert "a rate (default: 0.5)" in text and "--undocumented UNDOCUMENTED (default: 3)" in text
    assert "a mode (choices: a, b) (default: a)" in text
    assert "no default --flag" in text and "a flag --set" in text and "repeatable --out" in text
    assert "x.png" not in text and text.count("(default") == 4


def test_the_top_level_help_and_version_name_every_builtin(builtins_only, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert all(command in text for command in BUILTIN_COMMANDS)
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"fpdm {__version__}\n"
    assert __version__ == fpdm_package.__version__ and __version__[0].isdigit()


def test_a_deprecated_alias_stores_into_the_new_option_and_says_so_in_one_line(capsys):
    parser = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="batch")
    deprecated_alias(parser, "--batch", dest="batch_size", new="--batch-size", type=int)
    parser.add_argument("--class", dest="classes", action="append", help="a class")
    deprecated_alias(parser, "--label", dest="classes", new="--class", append=True)
    add_weights_option(parser)

    assert vars(parser.parse_args([])) == {"batch_size": 64, "classes": None, "weights": "ema"}
    assert capsys.readouterr().err == ""
    args = parser.parse_args(["--batch", "8", "--no-ema", "--class", "a", "--label", "b"])
    assert (args.batch_size, args.weights, args.classes) == (8, "raw", ["a", "b"])
    assert capsys.readouterr().err.splitlines() == [
        "fpdm: --batch is deprecated; use --batch-size",
        "fpdm: --no-ema is deprecated; use --weights raw",
        "fpdm: --label is deprecated; use --class",
    ]
    assert parser.parse_args(["--ema"]).weights == "ema"
    assert capsys.readouterr().err == "fpdm: --ema is deprecated; use --weights ema\n"
    text = parser.format_help()
    assert "--batch " not in text and "--batch]" not in text and "--no-ema" not in text and "--label" not in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch", "x"])  # the alias converts like the new option
    assert "invalid int value" in capsys.readouterr().err


def test_json_option_bare_means_stdout_and_a_path_means_a_file(capsys):
    parser = argparse.ArgumentParser()
    add_json_option(parser)
    assert parser.parse_args([]).json is None
    assert parser.parse_args(["--json"]).json == "-"
    assert parser.parse_args(["--json", "r.json"]).json == "r.json"


def test_solve_under_its_old_spelling_and_json_to_a_file(builtins_only, capsys, tmp_path):
    assert main(["solve", "--batch", "2", "--tokens", "2", "--dim", "8", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "fpdm: --batch is deprecated; use --batch-size\n"
    (report,) = json.loads(captured.out)
    assert report["solver"] == "fixed_point" and report["converged_fraction"] == 1.0

    target = tmp_path / "reports" / "solve.json"
    assert main(["solve", "--all", "--batch-size", "2", "--tokens", "2", "--dim", "8", "--json", str(target)]) == 0
    captured = capsys.readouterr()
    assert [r["solver"] for r in json.loads(target.read_text())] == ["anderson", "fixed_point"]
    assert "anderson" in captured.out and captured.err == ""  # the text report still goes to stdout


def test_plugins_json_to_stdout_or_a_file(builtins_only, capsys, tmp_path):
    assert main(["plugins", "--json", "-"]) == 0
    names = {entry["name"] for entry in json.loads(capsys.readouterr().out)}
    assert {"commands", "solvers"} <= names
    assert main(["plugins", "--json", str(tmp_path / "p.json")]) == 0
    assert {entry["name"] for entry in json.loads((tmp_path / "p.json").read_text())} == names
    assert "PLUGIN" in capsys.readouterr().out


def test_import_official_speaks_the_shared_flags(builtins_only, capsys):
    parser = command_parsers(build_parser())["import-official"]
    args = parser.parse_args(["model.pt", "--out", "runs/x", "--weights", "model"])
    assert (args.out, args.out_option, args.weights) == (None, "runs/x", "raw")
    assert capsys.readouterr().err == "fpdm: --weights model is deprecated; use --weights raw\n"
    assert parser.parse_args(["model.pt", "runs/x"]).weights is None  # keep both sets
    assert main(["import-official", "model.pt"]) == 2
    assert capsys.readouterr().err == "fpdm import-official: error: no output folder: give OUT (or --out PATH)\n"


# ------------------------------------------------------------------ the start path (subprocesses: a fresh interpreter)
def _imported(code: str, *args: str) -> list[str]:
    """Top-level packages imported by `python -X importtime -c code args` (plugins of this machine left out)."""
    env = {**os.environ, "FPDM_LOAD_PLUGINS": ""}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    return sorted({name.split(".")[0] for name in lines})


BUILD_EVERY_PARSER = """
from fpdm.apps.cli import build_parser, command_parsers
for parser in command_parsers(build_parser(fill_all=True)).values():
    parser.format_help()
"""
RUN_CLI = "import sys; from fpdm.apps.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize(
    "code, args",
    [
        ("import fpdm", ()),
        (RUN_CLI, ("--version",)),
        (RUN_CLI, ("--help",)),
        (BUILD_EVERY_PARSER, ()),
    ],
    ids=["import-fpdm", "version", "help", "every-command-parser"],
)
def test_the_start_path_never_imports_torch(code, args):
    heavy = sorted(set(_imported(code, *args)) & set(HEAVY))
    assert not heavy, f"imported {heavy}; keep command modules' top-level imports argparse-level (STYLE.md rule 14)"


def test_no_core_module_imports_the_lazy_package_root():
    from test_import_graph import graph, layer_of

    core = {m: targets for m, targets in graph().items() if layer_of(m) == "fpdm" and m != "fpdm"}
    offenders = sorted(m for m, targets in core.items() if "fpdm" in targets)
    assert not offenders, f"{offenders} import the package root; import fpdm.x.y (and fpdm.version) instead"


def test_every_public_name_resolves_lazily():
    assert set(fpdm_package.__all__) <= set(dir(fpdm_package))
    missing = [name for name in fpdm_package.__all__ if not hasattr(fpdm_package, name)]
    assert not missing, f"fpdm.{missing[0]} is in __all__ but does not resolve"
    assert fpdm_package.IterativeSolver.__module__ == "fpdm.solving.iterative"
    assert fpdm_package.config.load_config is fpdm_package.load_config  # submodules as attributes, as before
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        fpdm_package.nope  # noqa: B018


# ------------------------------------------------------------------ command plugins through the `fpdm.cli` group
HELLO = """
import fpdm

def hello(parser):
    parser.add_argument("--name", default="world", help="who")
    return lambda args: print(f"hello {args.name}") or 0

def broken(parser):
    raise RuntimeError("bad parser")

@fpdm.hookimpl
def register_commands(register):
    register("hello", hello, description="say hello")
    register("broken", broken, description="a factory that raises")
"""


def test_command_plugins_load_lazily_and_a_broken_one_is_one_line(tmp_path):
    fake_dist(tmp_path, "fpdm-hello", "1.0", {"hello": "fpdm_hello_cli"}, {"fpdm_hello_cli": HELLO}, group="fpdm.cli")
    env = {"PYTHONPATH": str(tmp_path), "FPDM_LOAD_PLUGINS": "fpdm-hello"}
    listing = fpdm("--help", env=env)
    assert listing.returncode == 0 and "hello" in listing.stdout and "broken" in listing.stdout
    assert fpdm("hello", "--name", "you", env=env).stdout == "hello you\n"
    assert "who (default: world)" in fpdm("hello", "--help", env=env).stdout
    broken = fpdm("broken", env=env)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().splitlines() == [
        "fpdm: error: command 'broken' from plugin 'hello' is unusable: RuntimeError: bad parser"
    ]


@pytest.mark.slow
def test_a_command_plugin_of_the_fpdm_group_still_runs(tmp_path):
    fake_dist(tmp_path, "fpdm-hello", "1.0", {"hello": "fpdm_hello_old"}, {"fpdm_hello_old": HELLO})
    env = {"PYTHONPATH": str(tmp_path), "FPDM_LOAD_PLUGINS": "fpdm-hello"}
    assert fpdm("hello", env=env).stdout == "hello world\n"
