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


CHOICES = {  # fields whose values come from a fixed list, with the list the error must spell out
    "train.precision": "auto, fp32, bf16",
    "train.lr_schedule": "constant, cosine, linear",
    "data.name": "fashion_mnist, image_folder, latents",
    "data.split": "train, test",
    "diffusion.prediction": "eps, v",
}
BOUNDED = {  # numeric fields and a value out of their range
    "train.lr": st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
    "train.steps": st.integers(max_value=0),
    "train.grad_accum": st.integers(max_value=0),
    "train.warmup_steps": st.integers(max_value=-1),
    "train.min_lr_ratio": st.floats(min_value=1.0, exclude_min=True, allow_infinity=False),
    "train.min_snr_gamma": st.floats(max_value=0.0, exclude_max=True, allow_infinity=False),
    "solver.max_iter": st.integers(max_value=-1),
    "model.mlp_ratio": st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
}


def _set(key: str, value: object) -> dict:
    group, name = key.split(".")
    return {group: {name: value}}


@given(st.sampled_from(sorted(CHOICES)), st.text(max_size=12))
def test_a_value_off_the_list_names_the_field_the_value_and_the_list(key, value):
    allowed = CHOICES[key]
    if value in allowed.split(", "):
        return
    with pytest.raises(UsageError) as info:
        load_config(base=_set(key, value))
    assert str(info.value) == f"{key}: {value!r} is not one of {allowed}"


@given(st.sampled_from(sorted(BOUNDED)).flatmap(lambda key: st.tuples(st.just(key), BOUNDED[key])))
def test_an_out_of_range_value_names_the_field_and_the_value(case):
    key, value = case
    with pytest.raises(UsageError) as info:
        load_config(base=_set(key, value))
    message = str(info.value)
    name = key.split(".")[1]
    assert message.startswith(f"{key}: ") and f"{name} must be " in message.replace("'", "") and "\n" not in message
    assert repr(value) in message or str(value) in message


def test_the_cli_prints_the_field_error_in_one_line(tmp_path):
    from reliability_support import cli

    code, _, err = cli("train", "--out", str(tmp_path / "r"), "--steps", "1", "--set", "train.precision=fp16")
    assert code == 2 and err == "fpdm train: error: train.precision: 'fp16' is not one of auto, fp32, bf16\n"
    code, _, err = cli("train", "--out", str(tmp_path / "r"), "--set", "train.tensorboard=3")
    assert code == 2 and err == "fpdm train: error: train.tensorboard must be bool, got int (3)\n"
