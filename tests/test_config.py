"""Config is frozen and strict: every bad input is a UsageError naming the key."""

from __future__ import annotations

import contextlib

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpdm.config import Config, SolverConfig, from_dict, load_config, parse_override, to_dict
from fpdm.errors import UsageError


def test_defaults_file_and_overrides_layer_in_order(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[solver]\nname = "fixed_point"\nmax_iter = 7\n[solver.options]\ndamping = 0.25\n')
    config = load_config(path, ["solver.max_iter=9"], defaults=("solver.tol=1e-3", "solver.max_iter=100"))
    assert config.solver == SolverConfig("fixed_point", 9, 1e-3, 1, {"damping": 0.25})
    assert from_dict(Config, to_dict(config)) == config
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.solver = SolverConfig()  # type: ignore[misc]


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("[solver\n", (), "bad TOML"),
        ("[solvr]\n", (), "unknown key 'solvr'; known keys in the config: model, diffusion, data, solver, train"),
        ("[solver]\nmax_iters = 3\n", (), "unknown key 'solver.max_iters'"),
        ("[solver]\nmax_iter = '3'\n", (), "solver.max_iter must be int, got str"),
        ("[solver]\nmax_iter = true\n", (), "solver.max_iter must be int, got bool"),
        ("[solver]\ntol = -1.0\n", (), "'tol' must be >= 0"),
        ("[solver]\ncheck_every = 0\n", (), "'check_every' must be >= 1"),
        ("solver = 3\n", (), "[solver] must be a table"),
        ("", ("solver.max_iter",), "--set expects KEY=VALUE"),
        ("[solver]\nname = 'x'\n", ("solver.name.x=1",), "'name' is a value, not a table"),
        ("", ("solver.name.x=1",), "solver.name must be str, got dict"),
        ("[solver]\ntol = nan\n", (), "'tol' must be >= 0"),
        ("", ("solver.max_iter=-2",), "'max_iter' must be >= 0"),
    ],
)
def test_bad_config_is_one_clear_usage_error(tmp_path, text, overrides, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_config(path, list(overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "item, expected",
    [
        ("a.b=3", 3),
        ("a.b=0.5", 0.5),
        ("a.b=true", True),
        ("a.b=anderson", "anderson"),
        ('a.b="3"', "3"),
        ("a.b=[1, 2]", [1, 2]),
    ],
)
def test_override_values_are_read_as_toml(item, expected):
    assert parse_override(item) == (["a", "b"], expected)


@given(st.text(max_size=200))
def test_arbitrary_text_never_escapes_as_anything_but_a_usage_error(text):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.toml"
        path.write_text(text, encoding="utf-8")
        with contextlib.suppress(UsageError):  # a usage error is fine; anything else escapes and fails
            load_config(path)


@given(
    st.dictionaries(
        st.sampled_from(["name", "max_iter", "tol", "check_every", "options", "junk"]),
        st.one_of(
            st.integers(-3, 3),
            st.floats(allow_nan=True),
            st.text(max_size=5),
            st.booleans(),
            st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        ),
    )
)
def test_arbitrary_solver_tables_build_or_fail_cleanly(table):
    try:
        config = from_dict(Config, {"solver": table})
    except UsageError:
        return
    assert isinstance(config.solver.max_iter, int) and config.solver.max_iter >= 0
