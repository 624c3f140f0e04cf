"""`fpdm` as a user runs it: in a subprocess, with third-party plugins installed as fake distributions."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import EXAMPLE_SRC, run_cli
from fakedist import fake_dist


fpdm = run_cli


@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    """The example plugin as pip would leave it: its dist-info with the entry point, its module importable."""
    site = tmp_path_factory.mktemp("site")
    fake_dist(site, "fpdm-plugin-example", "0.1.0", {"barzilai_borwein": "fpdm_plugin_example"})
    return {"PYTHONPATH": os.pathsep.join([str(site), str(EXAMPLE_SRC)]), "FPDM_LOAD_PLUGINS": "fpdm-plugin-example"}


def test_console_script_is_installed():
    assert shutil.which("fpdm") is not None


def test_plugins_lists_builtins_as_text_and_json():
    text = fpdm("plugins")
    assert text.returncode == 0, text.stderr
    assert "solvers" in text.stdout and "built-in" in text.stdout and "fixed_point, anderson" in text.stdout
    data = json.loads(fpdm("plugins", "--json").stdout)
    assert {"name": "solvers", "source": "built-in", "registered": {"solver": ["fixed_point", "anderson"]}, "error": None} in data


def test_a_third_party_plugin_is_listed_and_selected_by_name_and_by_config(example_site, tmp_path):
    data = json.loads(fpdm("plugins", "--json", env=example_site).stdout)
    entry = next(d for d in data if d["name"] == "barzilai_borwein")
    assert entry == {"name": "barzilai_borwein", "source": "fpdm-plugin-example 0.1.0",
                     "registered": {"solver": ["barzilai_borwein"]}, "error": None}

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


def test_a_broken_plugin_never_takes_the_cli_down(tmp_path):
    fake_dist(tmp_path, "fpdm-broken", "0.1", {"broken": "fpdm_broken_mod"}, {"fpdm_broken_mod": "raise RuntimeError('kaput')"})
    env = {"PYTHONPATH": str(tmp_path), "FPDM_LOAD_PLUGINS": "fpdm-broken"}
    listing = fpdm("plugins", env=env)
    assert listing.returncode == 0 and "broken" in listing.stdout and "import failed: RuntimeError: kaput" in listing.stdout
    assert fpdm("solve", "--all", env=env).returncode == 0


def test_solve_all_runs_every_registered_solver():
    result = fpdm("solve", "--all", "--rate", "0.9", "--json")
    reports = json.loads(result.stdout)
    assert [r["solver"] for r in reports] == ["anderson", "fixed_point"]
    assert all(r["converged_fraction"] == 1.0 for r in reports)
    assert reports[0]["iterations_max"] < reports[1]["iterations_max"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["solve", "--solver", "nope"], "unknown solver 'nope'; known: anderson, fixed_point"),
        (["solve", "--solver", "anderson", "--set", "solver.options.m=0"], "'m' must be >= 1"),
        (["solve", "--solver", "anderson", "--set", "solver.options.window=3"], "has no option 'window'; options: m, beta, lam"),
        (["solve", "--set", "solver.max_iter=-1"], "'max_iter' must be >= 0"),
        (["solve", "--set", "solver.bogus=1"], "unknown key 'solver.bogus'"),
        (["solve", "--set", "nonsense"], "--set expects KEY=VALUE"),
        (["solve", "--config", "/nonexistent.toml"], "config file not found"),
        (["solve", "--rate", "1.5"], "--rate must be in [0, 1)"),
        (["solve", "--batch", "0"], "must be >= 1"),
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


def test_debug_shows_the_traceback():
    result = fpdm("--debug", "solve", "--solver", "nope")
    assert result.returncode != 0 and "Traceback" in result.stderr
