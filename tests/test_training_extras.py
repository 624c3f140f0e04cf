"""The training extras: LR warm-up and decay, gradient accumulation, gradient-norm and clipping logs,
TensorBoard events, Min-SNR-gamma weighting, and loss/stats plots readable at any length."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fpdm.apps.plots import axis, draw_plot, line_plot, plot_axes
from fpdm.apps.train_cmd import _report, log_line
from fpdm.build import build_schedule
from fpdm.config import DiffusionConfig, to_dict
from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.errors import UsageError
from fpdm.io.checkpoint import list_checkpoints, load_checkpoint
from fpdm.training import loop
from fpdm.training.distributed import gradient_sync, micro_batches
from fpdm.training.loop import train
from fpdm.training.lr_schedule import lr_at
from fpdm.training.weighting import min_snr_weights, weight_losses
from reliability_support import cli
from support import REGISTRY, ROOT, tiny_config


def records(run) -> list[dict]:  # type: ignore[no-untyped-def]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ learning rate
def test_warmup_then_cosine_and_linear_decay_to_the_floor():
    kw = {"lr": 1.0, "total_steps": 110, "warmup_steps": 10, "min_lr_ratio": 0.1}
    assert [lr_at(s, schedule="cosine", **kw) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    for schedule in ("cosine", "linear"):
        assert lr_at(10, schedule=schedule, **kw) == 1.0  # the peak right after warm-up
        assert lr_at(60, schedule=schedule, **kw) == pytest.approx(0.55)  # half way: the mid point, both shapes
        assert lr_at(110, schedule=schedule, **kw) == pytest.approx(0.1)  # the floor at train.steps
    assert lr_at(35, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(35, schedule="linear", **kw) == pytest.approx(1.0 - 0.9 * 0.25)
    assert [lr_at(s, lr=3e-4, total_steps=5) for s in range(5)] == [3e-4] * 5  # the default: constant


@given(
    st.sampled_from(["constant", "cosine", "linear"]),
    st.integers(1, 500),
    st.integers(0, 50),
    st.floats(0.0, 1.0),
)
def test_the_rate_warms_up_then_never_rises_and_stays_above_the_floor(schedule, total, warmup, ratio):
    rates = [
        lr_at(s, lr=2.0, total_steps=total, schedule=schedule, warmup_steps=warmup, min_lr_ratio=ratio)
        for s in range(total)
    ]
    assert all(0 < r <= 2.0 for r in rates)
    rising, after = rates[: min(warmup, total)], rates[min(warmup, total) :]
    assert rising == sorted(rising) and after == sorted(after, reverse=True)
    assert all(r >= 2.0 * ratio - 1e-12 for r in after)


def test_resume_continues_the_schedule_exactly(images, tmp_path):
    extra = ("train.lr_schedule=cosine", "train.warmup_steps=2", "train.min_lr_ratio=0.1", "train.log_every=1")
    train(tiny_config(images, tmp_path / "straight", *extra), registry=REGISTRY, progress=False)
    train(tiny_config(images, tmp_path / "split", *extra, "train.steps=3"), registry=REGISTRY, progress=False)
    train(tiny_config(images, tmp_path / "split", *extra), resume=True, registry=REGISTRY, progress=False)
    straight, split = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    for key in straight.model:
        assert torch.equal(straight.model[key], split.model[key]), key
    expected = [lr_at(s, lr=1e-3, total_steps=6, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1) for s in range(6)]
    assert (
        [r["lr"] for r in records(tmp_path / "split")] == [r["lr"] for r in records(tmp_path / "straight")] == expected
    )


# ------------------------------------------------------------------------------------ gradient accumulation
def test_two_micro_batches_of_8_equal_one_batch_of_16(images, tmp_path, monkeypatch):
    """The same optimizer steps: same samples, noise, timesteps and S-JFB counts; summed micro-batch gradients."""
    calls: list[tuple[int, int, list[int]]] = []
    real = loop.sjfb_losses

    def spy(model, diffusion, solver, x, t, y, noise, **kw):  # type: ignore[no-untyped-def]
        calls.append((kw["n_no_grad"], kw["n_grad"], t.tolist()))
        return real(model, diffusion, solver, x, t, y, noise, **kw)

    monkeypatch.setattr(loop, "sjfb_losses", spy)
    common = ("train.batch_size=16", "train.steps=3", "train.ckpt_every=3", "train.log_every=3")
    one = train(tiny_config(images, tmp_path / "one", *common), registry=REGISTRY, progress=False)
    whole, calls[:] = list(calls), []
    two = train(tiny_config(images, tmp_path / "two", *common, "train.grad_accum=2"), registry=REGISTRY, progress=False)
    assert [len(t) for _, _, t in calls] == [8] * 6
    for step, (n_no_grad, n_grad, t) in enumerate(whole):  # each step's two micro-batches share its S-JFB draw
        first, second = calls[2 * step], calls[2 * step + 1]
        assert first[:2] == second[:2] == (n_no_grad, n_grad) and first[2] + second[2] == t
    a, b = load_checkpoint(one.checkpoint), load_checkpoint(two.checkpoint)
    for key in a.model:
        torch.testing.assert_close(b.model[key], a.model[key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(b.ema[key], a.ema[key], rtol=1e-5, atol=1e-6, msg=key)
    assert two.history[0]["loss"] == pytest.approx(one.history[0]["loss"], rel=1e-5)  # the whole batch's mean


def test_a_batch_that_does_not_split_into_micro_batches_is_one_line(tmp_path):
    code, _, err = cli("train", "--out", str(tmp_path / "r"), "--steps", "1", "--set", "train.grad_accum=3")
    assert code == 2 and err.strip() == (
        "fpdm train: error: [train] batch_size=64 does not split into grad_accum=3 equal micro-batches"
    )
    assert micro_batches(8, 2) == [slice(0, 4), slice(4, 8)]


def test_micro_batches_skip_the_all_reduce_but_the_last(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    plain = torch.nn.Linear(2, 2)
    assert type(gradient_sync(plain, sync=False)).__name__ == "nullcontext"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = DistributedDataParallel(plain)
        with gradient_sync(net, sync=False):
            assert not net.require_backward_grad_sync  # DDP's no_sync: gradients accumulate locally
            net(torch.ones(1, 2)).sum().backward()
        with gradient_sync(net, sync=True):
            assert net.require_backward_grad_sync
            net(torch.ones(1, 2)).sum().backward()
        torch.testing.assert_close(plain.weight.grad, torch.full((2, 2), 2.0))  # both micro-batches counted
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_with_two_micro_batches_each_match_one_process(images, tmp_path):
    def run(out, *extra: str, ranks: int) -> None:
        overrides = tiny_config(images, out, "train.steps=3", "train.ckpt_every=3", "train.device=cpu", *extra)
        args = ["train", "--no-progress", "--config", str(tmp_path / f"{out.name}.toml")]
        (tmp_path / f"{out.name}.toml").write_text(_toml(overrides))
        launch = (
            ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m"]
            if ranks > 1
            else ["-m"]
        )
        env = {**os.environ, "FPDM_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, *launch, "fpdm.apps.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=240,
        )
        assert result.returncode == 0, result.stderr[-3000:]

    run(tmp_path / "ddp", "train.grad_accum=2", ranks=2)
    run(tmp_path / "one", ranks=1)
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "ddp")
    for key in a.model:
        torch.testing.assert_close(b.model[key], a.model[key], rtol=1e-5, atol=1e-6, msg=key)


def _toml(config) -> str:  # type: ignore[no-untyped-def]
    """A config as a TOML file (tables of scalars and lists, as fpdm's configs are)."""
    lines = []
    for group, table in to_dict(config).items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items() if value is not None and value != {}]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- gradient norm and clipping
def test_gradient_norm_and_clipping_are_logged_and_printed(images, tmp_path):
    run = train(
        tiny_config(images, tmp_path / "c", "train.grad_clip=1e-3", "train.log_every=1", "train.steps=2"),
        registry=REGISTRY,
        progress=False,
    )
    for record in run.history:  # one step per record: the scale is exactly clip_grad_norm_'s factor
        assert record["grad_norm"] > 1e-3 and record["clipped"] == 1.0
        assert record["clip_scale"] == pytest.approx(1e-3 / record["grad_norm"])
        assert record["grad_norm_max"] == record["grad_norm"]
    assert records(tmp_path / "c") == run.history
    line = log_line(run.history[0])
    assert f"grad norm {run.history[0]['grad_norm']:.3g} (clipped 100%, x0.00" in line and "lr 0.001" in line
    free = train(tiny_config(images, tmp_path / "f", "train.steps=2"), registry=REGISTRY, progress=False)
    assert free.history[0]["clipped"] == 0.0 and free.history[0]["clip_scale"] == 1.0
    assert "clipped" not in log_line(free.history[0])


# ------------------------------------------------------------------------------------------ TensorBoard
def test_tensorboard_events_mirror_the_jsonl_across_a_resume(images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(images, tmp_path / "tb", "train.tensorboard=true", "train.steps=4", "train.ckpt_every=2")
    train(config, registry=REGISTRY, progress=False)
    shutil.rmtree(list_checkpoints(tmp_path / "tb" / "checkpoints")[-1])  # killed after logging step 4, unsaved
    train(config, resume=True, registry=REGISTRY, progress=False)  # from step 2: step 4 is logged again
    events = EventAccumulator(str(tmp_path / "tb" / "tb")).Reload()
    logged = records(tmp_path / "tb")
    for key in ("loss", "grad_norm", "lr", "fp_residual"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [r["step"] for r in logged] == [2, 4]  # the first run's 4 purged
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in logged], rel=1e-6)


def test_tensorboard_missing_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: importing it raises
    code, _, err = cli("train", "--out", str(tmp_path / "r"), "--steps", "1", "--set", "train.tensorboard=true")
    assert code == 2 and err.strip() == (
        "fpdm train: error: train.tensorboard = true needs the tensorboard package: pip install tensorboard"
    )
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ min-SNR-gamma
@given(st.floats(0.1, 20.0), st.sampled_from(["linear", "cosine"]))
def test_min_snr_weights_follow_the_formula(gamma, schedule):
    ac = GaussianDiffusion(build_schedule(DiffusionConfig(schedule=schedule), REGISTRY)).alphas_cumprod
    eps = min_snr_weights(ac, gamma=gamma, prediction="eps")
    v = min_snr_weights(ac, gamma=gamma, prediction="v")
    for t in (0, 10, 100, 500, 999):
        snr = float(ac[t]) / (1 - float(ac[t]))
        assert float(eps[t]) == pytest.approx(min(snr, gamma) / snr, rel=1e-12)
        assert float(v[t]) == pytest.approx(min(snr, gamma) / (snr + 1), rel=1e-12)
    assert bool((eps <= 1).all()) and bool((v < 1).all()) and bool((v > 0).all())


def test_min_snr_at_zero_terminal_snr_and_bad_input():
    ac = torch.tensor([0.99, 0.5, 0.0], dtype=torch.float64)  # SNR 99, 1, 0
    assert min_snr_weights(ac, gamma=5.0, prediction="v").tolist() == pytest.approx([5 / 100, 1 / 2, 0.0])
    with pytest.raises(UsageError, match="gamma must be > 0"):
        min_snr_weights(ac, gamma=0.0, prediction="eps")
    with pytest.raises(UsageError, match="eps and v"):
        min_snr_weights(ac, gamma=1.0, prediction="x0")


def test_weighting_scales_the_mse_term_only():
    losses = {"mse": torch.tensor([1.0, 2.0]), "vb": torch.tensor([0.5, 0.25]), "loss": torch.tensor([1.5, 2.25])}
    out = weight_losses(losses, torch.tensor([0.5, 1.0]))
    assert out["loss"].tolist() == [1.0, 2.25] and out["mse"] is losses["mse"] and out["vb"] is losses["vb"]
    assert weight_losses({"mse": torch.tensor([2.0]), "loss": torch.tensor([2.0])}, torch.tensor([0.25]))[
        "loss"
    ].tolist() == [0.5]


def test_training_weights_each_sample_by_its_timestep(images, tmp_path, monkeypatch):
    seen: list[tuple[list[int], dict]] = []
    real = loop.sjfb_losses

    def spy(model, diffusion, solver, x, t, y, noise, **kw):  # type: ignore[no-untyped-def]
        losses, out = real(model, diffusion, solver, x, t, y, noise, **kw)
        seen.append((t.tolist(), {k: v.detach().clone() for k, v in losses.items()}))
        return losses, out

    monkeypatch.setattr(loop, "sjfb_losses", spy)
    run = train(
        tiny_config(images, tmp_path / "snr", "train.min_snr_gamma=5", "train.steps=1", "train.log_every=1"),
        registry=REGISTRY,
        progress=False,
    )
    (t, losses), record = seen[0], run.history[0]
    ac = GaussianDiffusion(build_schedule(DiffusionConfig(), REGISTRY)).alphas_cumprod  # the tiny run's schedule
    w = min_snr_weights(ac, gamma=5.0, prediction="eps")[t].float()
    assert record["loss"] == pytest.approx(float((w * losses["mse"] + losses["vb"]).mean()), rel=1e-5)
    assert record["mse"] == pytest.approx(float(losses["mse"].mean()), rel=1e-6)  # logged unweighted
    assert float(w.min()) < 1.0  # some sample's SNR was above gamma: the weighting did something


# ------------------------------------------------------------------------------------------ plots
@pytest.mark.parametrize("n", [1, 2, 5, 3000])
@pytest.mark.parametrize("log_y", [False, True])
def test_loss_plot_axes_are_readable_at_any_length(n, log_y, tmp_path):
    points = [(50 * (i + 1), 0.45 * math.exp(-i / 500)) for i in range(n)]
    x_axis, y_axis = plot_axes({"loss": points}, log_y=log_y)
    for ax, values in ((x_axis, [x for x, _ in points]), (y_axis, [y for _, y in points])):
        assert ax.hi > ax.lo and all(0 < ax.unit(v) < 1 for v in values)  # every point inside the frame
        assert len(ax.ticks) >= 2 and all(ax.lo <= tick <= ax.hi for tick in ax.ticks)
        assert len(set(ax.labels)) == len(ax.labels)  # labels that tell the ticks apart
    assert all(label.isdigit() for label in x_axis.labels)  # steps are whole numbers
    path = line_plot({"loss": points}, tmp_path / "loss.png", title="t", xlabel="step", ylabel="loss", log_y=log_y)
    with Image.open(path) as img:
        img.verify()
        assert img.format == "PNG" and img.size == (720, 440)


def test_a_single_point_is_drawn_as_a_marker():
    img = draw_plot({"loss": [(1, 0.5)]}, title="t", xlabel="x", ylabel="y", size=(200, 120))
    counts = {color: n for n, color in img.getcolors(maxcolors=1 << 16)}
    assert counts[(31, 119, 180)] > 20  # the marker (the legend text alone is a few pixels)


def test_flat_stats_series_get_a_range_of_their_own():
    """stats.png of a one-step sample: allocated and spent iterations equal, the residual a single value."""
    x_axis, y_axis = plot_axes({"allocated": [(0, 4.0)], "spent (mean)": [(0, 4.0)]})
    assert (x_axis.lo, x_axis.hi) == (-1.0, 1.0) and y_axis.lo < 4.0 < y_axis.hi
    _, log_axis = plot_axes({"mean": [(0, 1e-3)], "worst": [(0, 1e-3)]}, log_y=True)
    assert log_axis.lo < -3 < log_axis.hi and len(log_axis.ticks) >= 2
    empty = plot_axes({"mean": [(0, 0.0), (1, math.nan)]}, log_y=True)  # nothing drawable on a log axis
    assert all(ax.hi > ax.lo for ax in empty)
    draw_plot({"mean": [(0, 0.0)]}, title="t", xlabel="x", ylabel="y", log_y=True)  # draws a note, no error


@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=60),
    st.booleans(),
)
def test_any_finite_series_gets_a_proper_axis(values, log):
    values = [abs(v) + 1e-6 for v in values] if log else values
    ax = axis(values, log=log)
    assert ax.hi > ax.lo and all(0 <= ax.unit(v) <= 1 for v in values)
    assert len(ax.ticks) >= 2 and len(set(ax.labels)) == len(ax.labels)


def test_train_report_plots_one_logged_point(tmp_path, capsys):
    record = {"step": 1, "loss": 0.5, "grad_norm": 2.0, "clipped": 0.0, "clip_scale": 1.0, "lr": 1e-3, "img_per_s": 9.0}
    _report([record], tmp_path)
    out = capsys.readouterr().out
    assert "step       1  loss 0.5000  grad norm 2  lr 0.001  9 img/s" in out
    with Image.open(tmp_path / "loss.png") as img:
        assert img.format == "PNG"
