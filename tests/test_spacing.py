"""Timestep spacings: official equals guided-diffusion's respace.py at every count, the four rules' properties,
and --spacing from the CLI (sample, eval, export, the ONNX Runtime samplers) to the sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fpdm.apps.cli import build_parser, main
from fpdm.apps.sampling_setup import sample_config
from fpdm.errors import UsageError
from fpdm.pipeline import load
from fpdm.plugins.schedules import LinearSchedule
from fpdm.spacing import SPACINGS, spaced_timesteps

T = 1000


def respace_py(total: int, steps: int) -> list[int]:
    """guided-diffusion / DiT `space_timesteps(total, [steps])` for one section (steps >= 2), transcribed."""
    frac_stride = (total - 1) / (steps - 1)
    cur_idx = 0.0
    taken_steps = []
    for _ in range(steps):
        taken_steps.append(round(cur_idx))
        cur_idx += frac_stride
    return taken_steps


def old_linspace(total: int, steps: int) -> list[int]:
    return torch.linspace(0, total - 1, steps, dtype=torch.float64).round().long().tolist()


def test_official_is_respace_py_at_every_count_and_linspace_the_old_rule():
    schedule = LinearSchedule()
    differ = []
    for steps in range(2, T + 1):
        official = sorted(schedule.sampling_timesteps(steps).tolist())  # the default spacing
        assert official == respace_py(T, steps), steps
        assert sorted(schedule.sampling_timesteps(steps, spacing="linspace").tolist()) == old_linspace(T, steps)
        if official != old_linspace(T, steps):
            differ.append(steps)
    assert differ[:12] == [21, 23, 27, 35, 39, 43, 45, 47, 53, 61, 67, 69] and len(differ) == 282
    assert 499 in respace_py(T, 21) and 500 in old_linspace(T, 21)  # the docs' example


def test_one_step_starts_from_the_last_timestep():
    for spacing in ("official", "linspace", "trailing"):
        assert spaced_timesteps(T, 1, spacing=spacing).tolist() == [T - 1]
    assert spaced_timesteps(T, 1, spacing="leading").tolist() == [0]  # arange(0, 1) * T


def _first_last(spacing: str, total: int, steps: int) -> tuple[int, int]:
    if spacing == "leading":
        return (steps - 1) * (total // steps), 0
    if spacing == "trailing":
        return total - 1, round(total / steps) - 1
    return total - 1, 0 if steps > 1 else total - 1


INTEGER_SPACINGS = [s for s in SPACINGS if s != "karras"]


@given(data=st.data(), total=st.integers(1, 1200), spacing=st.sampled_from(INTEGER_SPACINGS))
def test_every_rule_gives_distinct_in_range_timesteps_highest_first(data, total, spacing):
    steps = data.draw(st.integers(1, total))
    ts = spaced_timesteps(total, steps, spacing=spacing)
    assert ts.dtype == torch.int64 and ts.shape == (steps,)
    assert (ts[1:] < ts[:-1]).all() and int(ts.min()) >= 0 and int(ts.max()) <= total - 1
    assert (int(ts[0]), int(ts[-1])) == _first_last(spacing, total, steps)
    if spacing == "leading":  # Lin et al. 2023, Table 2
        assert ts.tolist() == (np.arange(0, steps) * (total // steps))[::-1].tolist()
    if spacing == "trailing":
        reference = np.round(np.arange(total, 0, -total / steps)).astype(np.int64) - 1
        if len(reference) == steps:  # a float arange can overshoot by one element; the rule cannot
            assert ts.tolist() == reference.tolist()


@pytest.mark.parametrize("spacing", SPACINGS)
def test_impossible_steps_and_unknown_names_are_one_line(spacing):
    for steps in (0, T + 1):
        with pytest.raises(UsageError, match=rf"^steps must be in 1\.\.{T} \(the training timesteps\), got {steps}$"):
            LinearSchedule(num_train_timesteps=T).sampling_timesteps(steps, spacing=spacing)
    with pytest.raises(UsageError, match="^unknown spacing 'x'; known: official, linspace, leading, trailing, karras$"):
        LinearSchedule().sampling_timesteps(5, spacing="x")


def test_the_flag_parses_for_eval_and_export_and_sample_help_names_the_default(capsys):
    parser = build_parser()
    args = parser.parse_args(["eval", "RUN", "--ref", "D", "--spacing", "leading"])
    assert sample_config(args).spacing == "leading"
    assert sample_config(parser.parse_args(["eval", "RUN", "--ref", "D"])).spacing is None  # the sampler's default
    export = ["export", "RUN", "--onnx", "--whole-loop", "--steps", "4", "--spacing", "trailing"]
    assert parser.parse_args(export).spacing == "trailing"
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "official (guided-diffusion's respacing; the default of ddpm and ddim), trailing (the default of" in shown


def _cli_sample(model: str, out, *extra: str) -> dict:  # type: ignore[no-untyped-def]
    code = main(["sample", model, "--n", "3", "--seed", "4", "--out", str(out), "--no-progress", *extra])
    assert code == 0
    return json.loads((out / "stats.json").read_text())


def _pngs(out) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.stack([np.array(Image.open(p)) for p in sorted((out / "images").iterdir())])  # (N, H, W)


def test_the_cli_flag_reaches_the_sampler_and_equals_pipe_sample(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("FPDM_LOAD_PLUGINS", "")
    stats = _cli_sample(str(trained), tmp_path / "t", "--steps", "5", "--spacing", "trailing")
    assert stats["spacing"] == "trailing"
    assert [s["timestep"] for s in stats["per_step"]] == [999, 799, 599, 399, 199]
    pipe = load(trained, device="cpu")
    want = pipe.sample(n=3, steps=5, seed=4, spacing="trailing", output_type="numpy")
    assert want.plan["spacing"] == "trailing"
    assert np.array_equal(_pngs(tmp_path / "t"), want.images[..., 0])
    default = _cli_sample(str(trained), tmp_path / "o", "--steps", "5")
    assert default["spacing"] == "official"
    assert [s["timestep"] for s in default["per_step"]] == [999, 749, 500, 250, 0]


def test_a_bad_spacing_name_is_one_line_exit_2(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FPDM_LOAD_PLUGINS", "")
    out = tmp_path / "bad"
    code = main(["sample", str(trained), "--n", "2", "--steps", "5", "--spacing", "nope", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "unknown spacing 'nope'; known: official, linspace, leading, trailing, karras" in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_an_onnx_whole_loop_exported_with_trailing_samples_as_eager(trained, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from fpdm.export.onnx import read_metadata

    monkeypatch.setenv("FPDM_LOAD_PLUGINS", "")
    path = tmp_path / "loop.onnx"
    args = ["export", str(trained), "--onnx", "--whole-loop", "--steps", "5", "--iters", "2", "--out", str(path)]
    assert main([*args, "--spacing", "trailing"]) == 0
    meta = read_metadata(path)
    assert meta["sampling"]["spacing"] == "trailing" and meta["timesteps"] == [199, 399, 599, 799, 999]
    stats = _cli_sample(str(path), tmp_path / "ort")
    assert stats["spacing"] == "trailing"
    eager = load(trained, device="cpu").sample(n=3, steps=5, seed=4, spacing="trailing", iters=2)
    got = torch.from_numpy(_pngs(tmp_path / "ort")).float()
    want = ((eager.images[:, 0] + 1) * 127.5).clamp(0, 255)
    assert (got - want).abs().max().item() <= 1.0  # uint8 rounding of images equal within 1e-3
    capsys.readouterr()
    assert main(["sample", str(path), "--spacing", "official", "--out", str(tmp_path / "x")]) == 2
    assert "drop --spacing official" in capsys.readouterr().err

    model = onnx.load(str(path))  # a file from before spacings were recorded reads as official
    for prop in model.metadata_props:
        if prop.key == "fpdm.sampling":
            prop.value = json.dumps({k: v for k, v in json.loads(prop.value).items() if k != "spacing"})
    onnx.save(model, str(tmp_path / "old.onnx"))
    assert read_metadata(tmp_path / "old.onnx")["sampling"]["spacing"] == "official"


@pytest.mark.slow
def test_the_onnx_step_sampler_uses_the_same_rule(trained, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("FPDM_LOAD_PLUGINS", "")
    path = tmp_path / "step.onnx"
    assert main(["export", str(trained), "--onnx", "--iters", "2", "--out", str(path)]) == 0
    stats = _cli_sample(str(path), tmp_path / "ort", "--steps", "5", "--spacing", "leading")
    assert stats["spacing"] == "leading"
    assert [s["timestep"] for s in stats["per_step"]] == [800, 600, 400, 200, 0]
    eager = load(trained, device="cpu").sample(n=3, steps=5, seed=4, spacing="leading", iters=2)
    got = torch.from_numpy(_pngs(tmp_path / "ort")).float()
    want = ((eager.images[:, 0] + 1) * 127.5).clamp(0, 255)
    assert (got - want).abs().max().item() <= 1.0


@given(steps=st.integers(1, 200), zero_snr=st.booleans())
def test_karras_levels_follow_the_rho_7_ramp_between_the_finite_sigmas(steps, zero_snr):
    from fpdm.diffusion.gaussian import GaussianDiffusion
    from fpdm.spacing import log_sigmas

    schedule = LinearSchedule(zero_terminal_snr=zero_snr)
    ts = schedule.sampling_timesteps(steps, spacing="karras")
    assert ts.dtype == torch.float64 and ts.shape == (steps,) and (ts[1:] < ts[:-1]).all()
    assert float(ts[0]) == (998.0 if zero_snr else 999.0) and (steps == 1 or float(ts[-1]) == 0.0)
    # The interpolated levels are Karras et al.'s sigmas, eq. 5 with rho = 7.
    process = GaussianDiffusion(schedule, prediction="v").respace(sorted(ts.tolist()))
    sigmas = log_sigmas(process.alphas_cumprod).exp().flip(0)  # (steps,) noisiest first
    logs = log_sigmas(schedule.alphas_cumprod())
    hi, lo = logs[-2 if zero_snr else -1].exp() ** (1 / 7), logs[0].exp() ** (1 / 7)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(sigmas, (hi + ramp * (lo - hi)) ** 7, rtol=1e-9, atol=0)
    assert process.timestep_map.dtype == (torch.int64 if bool((ts == ts.round()).all()) else torch.float64)


@pytest.mark.parametrize("sampler, spacing", [("ddpm", "official"), ("ddim", "official"), ("dpmpp_3m", "trailing")])
def test_without_a_spacing_each_sampler_takes_its_default(trained, sampler, spacing):
    pipe = load(trained, device="cpu")
    out = pipe.sample(n=1, steps=5, iters=1, sampler=sampler)
    assert out.plan["spacing"] == spacing
    first = [s["timestep"] for s in out.stats][-1]
    assert first == (0 if spacing == "official" else 199)  # trailing never spends an evaluation at t = 0
