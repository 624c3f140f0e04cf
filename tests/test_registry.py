"""The plugin system: isolation, validation, duplicate and unknown names, entry-point loading."""

from __future__ import annotations

import types

import pytest
import torch

import fpdm
from fakedist import fake_dist
from fpdm.build import build_solver
from fpdm.config import load_config
from fpdm.errors import PluginError, UnknownNameError, UsageError
from fpdm.plugins.solvers import FixedPointIteration
from fpdm.registry import Registry, plugins_from_env


def plugin(**hooks):  # type: ignore[no-untyped-def]
    return types.SimpleNamespace(**{name: fpdm.hookimpl(fn) for name, fn in hooks.items()})


@pytest.fixture
def registry() -> Registry:
    return Registry.load(only=[])


def test_builtins_load_through_entry_points(registry):
    infos = {info.name: info for info in registry.plugins()}
    assert infos["solvers"].source == "built-in" and infos["solvers"].error is None
    assert set(infos["solvers"].registered["solver"]) == {"fixed_point", "anderson"}
    assert {"plugins", "solve"} <= set(registry.names("command"))


def test_unknown_name_lists_the_known_ones(registry):
    with pytest.raises(UnknownNameError, match="unknown solver 'andersen'; known: anderson, fixed_point"):
        registry.create("solver", "andersen")
    with pytest.raises(UnknownNameError, match="unknown kind 'solvr'"):
        registry.names("solvr")


def test_a_third_party_solver_registers_and_is_built_by_config(registry):
    class Halfway(FixedPointIteration):
        pass

    info = registry.add_plugin(plugin(register_solvers=lambda register: register("halfway", Halfway)), name="mine")
    assert info.error is None and info.registered == {"solver": ("halfway",)}
    config = load_config(overrides=["solver.name=halfway", "solver.options.damping=0.5"])
    assert build_solver(config.solver, registry) == Halfway(damping=0.5)


def test_duplicate_name_rejects_the_plugin_whole_and_builtins_keep_working(registry):
    def hook(register):  # type: ignore[no-untyped-def]
        register("mine_first", FixedPointIteration)
        register("anderson", FixedPointIteration)

    info = registry.add_plugin(plugin(register_solvers=hook), name="dup")
    assert "solver 'anderson' is already registered by plugin 'solvers'" in info.error
    assert "mine_first" not in registry.names("solver")  # rolled back
    assert type(registry.create("solver", "anderson")).__name__ == "Anderson"


@pytest.mark.parametrize(
    "hooks, message",
    [
        ({"register_solvers": lambda register: 1 / 0}, "ZeroDivisionError"),
        ({"register_solver": lambda register: None}, "unknown hook 'register_solver'"),
        ({"register_solvers": lambda regster: None}, "invalid plugin"),
        ({"register_solvers": lambda register: register("x", object)}, "object does not derive from fpdm.Solver"),
        ({"register_solvers": lambda register: register("has space", FixedPointIteration)}, "bad solver name"),
        ({"register_solvers": lambda register: register("x", 42)}, "is not callable"),
        (
            {"register_solvers": lambda register: [register("x", FixedPointIteration) for _ in range(2)]},
            "registered twice",
        ),
    ],
)
def test_a_misbehaving_plugin_is_reported_by_name_and_skipped(registry, hooks, message):
    before = {kind: registry.names(kind) for kind in ("solver", "command")}
    info = registry.add_plugin(plugin(**hooks), name="bad")
    assert info.error is not None and message in info.error
    assert {kind: registry.names(kind) for kind in before} == before
    good = registry.add_plugin(
        plugin(register_solvers=lambda register: register("ok", FixedPointIteration)), name="good"
    )
    assert good.error is None and "ok" in registry.names("solver")


def test_a_factory_that_returns_the_wrong_type_or_raises_is_named(registry):
    def hook(register):  # type: ignore[no-untyped-def]
        register("liar", lambda: "not a solver")
        register("crash", lambda: (_ for _ in ()).throw(RuntimeError("boom")))

    registry.add_plugin(plugin(register_solvers=hook), name="shady")
    with pytest.raises(PluginError, match="solver 'liar' from plugin 'shady' returned str, not an fpdm.Solver"):
        registry.create("solver", "liar")
    with pytest.raises(PluginError, match="solver 'crash' from plugin 'shady' failed to build: RuntimeError: boom"):
        registry.create("solver", "crash")
    with pytest.raises(UsageError, match="has no option 'm'; options: \\(none\\)"):
        registry.create("solver", "liar", m=1)


def test_same_plugin_name_twice_is_refused(registry):
    registry.add_plugin(plugin(register_solvers=lambda register: None), name="twin")
    info = registry.add_plugin(plugin(register_solvers=lambda register: None), name="twin")
    assert "already loaded" in info.error


GOOD = """
import fpdm
from fpdm.plugins.solvers import FixedPointIteration

class Toy(FixedPointIteration):
    pass

@fpdm.hookimpl
def register_solvers(register):
    register("toy", Toy, description="a toy")
"""


def test_entry_points_load_one_by_one_with_isolation(tmp_path, monkeypatch):
    fake_dist(tmp_path, "fpdm-toy", "1.2.3", {"toy": "fpdm_toy_plugin"}, {"fpdm_toy_plugin": GOOD})
    fake_dist(
        tmp_path,
        "fpdm-broken",
        "0.1",
        {"broken": "fpdm_broken_plugin"},
        {"fpdm_broken_plugin": "raise ImportError('no such thing')"},
    )
    fake_dist(tmp_path, "fpdm-missing", "0.1", {"missing": "fpdm_module_that_does_not_exist"})
    monkeypatch.syspath_prepend(str(tmp_path))

    infos = {info.name: info for info in Registry.load().plugins()}
    assert infos["toy"].source == "fpdm-toy 1.2.3" and infos["toy"].registered == {"solver": ("toy",)}
    assert infos["broken"].error == "import failed: ImportError: no such thing"
    assert infos["missing"].error.startswith("import failed: ModuleNotFoundError")
    assert infos["solvers"].error is None
    with pytest.raises(UnknownNameError, match=r"2 plugin\(s\) failed to load: broken, missing; see `fpdm plugins`"):
        Registry.load().create("solver", "something")

    only = Registry.load(only=["fpdm-toy"])  # by distribution name
    builtins = {i.name for i in Registry.load(only=[]).plugins()}
    assert "toy" in only.names("solver") and {i.name for i in only.plugins()} == builtins | {"toy"}
    assert "toy" in Registry.load(only=["toy"]).names("solver")  # by entry-point name
    assert "toy" not in Registry.load(only=[]).names("solver")


@pytest.mark.parametrize("value, expected", [(None, None), ("", []), ("a", ["a"]), (" a, b ,", ["a", "b"])])
def test_fpdm_load_plugins_env(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("FPDM_LOAD_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("FPDM_LOAD_PLUGINS", value)
    assert plugins_from_env() == expected


def test_config_selects_the_example_plugin_by_name():
    from support import REGISTRY

    config = load_config(overrides=["solver.name=barzilai_borwein", "solver.options.max_step=10"])
    solver = build_solver(config.solver, REGISTRY)
    assert type(solver).__name__ == "BarzilaiBorwein" and solver.max_step == 10.0
    f = lambda z: 0.5 * z + 1.0  # noqa: E731
    result = solver.solve(f, torch.zeros(2, 3), max_iter=50, tol=1e-6)
    torch.testing.assert_close(result.z, torch.full((2, 3), 2.0))


# ------------------------------------------------------------------ two entry-point groups, loaded on first need
COMMAND_ONLY = """
import fpdm

@fpdm.hookimpl
def register_commands(register):
    register("hello", lambda parser: (lambda args: 0), description="say hello")
"""
MARKS_ITS_IMPORT = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
"""
COMMAND_AND_SOLVER = """
import fpdm
from fpdm.plugins.solvers import FixedPointIteration

@fpdm.hookimpl
def register_commands(register):
    register("{command}", lambda parser: (lambda args: 0))

@fpdm.hookimpl
def register_solvers(register):
    register("{solver}", FixedPointIteration)
"""


def test_a_command_lookup_loads_only_the_cli_group(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    fake_dist(
        tmp_path, "fpdm-hello", "1.0", {"hello": "fpdm_hello_cmd"}, {"fpdm_hello_cmd": COMMAND_ONLY}, group="fpdm.cli"
    )
    fake_dist(
        tmp_path,
        "fpdm-heavy",
        "1.0",
        {"heavy": "fpdm_heavy_mod"},
        {"fpdm_heavy_mod": MARKS_ITS_IMPORT.format(marker=str(marker))},
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    registry = Registry.load()
    assert {"hello", "plugins", "solve"} <= set(registry.names("command"))
    assert registry.entry("command", "hello").plugin == "hello"
    assert not marker.exists()  # the `fpdm` group (solvers, models ...: torch) was never imported
    assert "anderson" in registry.names("solver") and marker.exists()
    assert "hello" not in Registry.load(only=[]).names("command")  # FPDM_LOAD_PLUGINS holds for both groups


def test_a_command_registered_through_the_fpdm_group_is_found_on_a_miss(tmp_path, monkeypatch):
    fake_dist(tmp_path, "fpdm-old", "1.0", {"old": "fpdm_old_cmd"}, {"fpdm_old_cmd": COMMAND_ONLY})
    monkeypatch.syspath_prepend(str(tmp_path))

    registry = Registry.load()
    assert "hello" not in registry.names("command")  # not in `fpdm.cli`: `fpdm --help` does not list it
    assert registry.entry("command", "hello").plugin == "old"  # but `fpdm hello` finds it
    with pytest.raises(UnknownNameError, match="unknown command 'nope'"):
        registry.entry("command", "nope")


def test_other_kinds_of_a_cli_plugin_register_after_the_builtins(tmp_path, monkeypatch):
    fake_dist(
        tmp_path,
        "fpdm-clash",
        "1.0",
        {"clash": "fpdm_clash_mod"},
        {"fpdm_clash_mod": COMMAND_AND_SOLVER.format(command="clashcmd", solver="anderson")},
        group="fpdm.cli",
    )
    fake_dist(
        tmp_path,
        "fpdm-both",
        "1.0",
        {"both": "fpdm_both_mod"},
        {"fpdm_both_mod": COMMAND_AND_SOLVER.format(command="bothcmd", solver="both_solver")},
        group="fpdm.cli",
        more_groups={"fpdm": {"both": "fpdm_both_mod"}},
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    registry = Registry.load()
    assert {"clashcmd", "bothcmd"} <= set(registry.names("command"))
    assert type(registry.create("solver", "anderson")).__name__ == "Anderson"  # the built-in kept its name
    infos = {info.name: info for info in registry.plugins()}
    assert "solver 'anderson' is already registered by plugin 'solvers'" in infos["clash"].error
    assert infos["clash"].registered == {"command": ("clashcmd",)}  # its command stays usable
    assert infos["both"].error is None  # named in both groups, loaded once
    assert infos["both"].registered == {"command": ("bothcmd",), "solver": ("both_solver",)}
    assert [info.name for info in registry.plugins()].count("both") == 1
