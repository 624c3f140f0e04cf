"""Sampling: allocations within budget, exact block accounting, reuse, determinism, guidance, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fpdm.build import load_denoiser
from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.diffusion.sampling import generate, plan_iterations, sample
from fpdm.errors import UsageError
from fpdm.io.checkpoint import load_checkpoint
from fpdm.models.transformer import FPDM, DiT
from fpdm.plugins.schedules import LinearSchedule
from support import REGISTRY, run_cli

# Every allocator's plan fits its budget: fpdm.testing's allocator suite (tests/test_conformance.py).


@given(steps=st.integers(2, 60), extra=st.integers(0, 400))
def test_ramps_lean_the_way_they_say(steps, extra):
    up = REGISTRY.create("allocator", "increasing").allocate(steps + extra, list(range(steps)))
    down = REGISTRY.create("allocator", "decreasing").allocate(steps + extra, list(range(steps)))
    half = steps // 2
    assert sum(up[:half]) <= sum(up[-half:]) and sum(down[:half]) >= sum(down[-half:])
    assert sum(up) == sum(down) == steps + extra  # the paper's ramps spend the whole budget


def contractive_fpdm(**kw) -> FPDM:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = FPDM(input_size=8, in_channels=1, patch_size=2, hidden_size=32, num_heads=2, num_classes=3, **kw)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)  # small weights: every map is a strong contraction
    return model.eval()


@given(steps=st.integers(1, 8), extra=st.integers(0, 30), name=st.sampled_from(["uniform", "increasing", "decreasing"]))
def test_blocks_spent_are_the_plan_plus_pre_and_post(steps, extra, name):
    model = contractive_fpdm(pre_depth=1, post_depth=2)
    budget = steps * (model.blocks_per_call(0) + 1) + extra
    timesteps = list(range(steps))[::-1]
    plan = plan_iterations(model, timesteps, budget=budget, iters=0, allocator=REGISTRY.create("allocator", name))
    kept = list(range(20))[:: max(1, 20 // steps)][:steps]
    diffusion = GaussianDiffusion(LinearSchedule(num_train_timesteps=20)).respace(kept)
    result = sample(
        model,
        diffusion,
        generators=[torch.Generator().manual_seed(k) for k in range(2)],
        shape=(1, 8, 8),
        labels=torch.tensor([0, 2]),
        sampler=REGISTRY.create("sampler", "ddim"),
        solver=REGISTRY.create("solver", "fixed_point"),
        iterations=plan,
        reuse=REGISTRY.create("reuse_policy", "reuse"),
    )
    assert result.blocks.tolist() == [steps * 3 + sum(plan)] * 2
    assert all(result.blocks <= budget)
    assert [s.iterations_mean for s in result.steps] == plan


def test_budget_that_cannot_pay_and_dit_accounting():
    model = contractive_fpdm()
    uniform = REGISTRY.create("allocator", "uniform")
    with pytest.raises(UsageError, match="budget 29 cannot pay for 10 FPDM model evaluations: .* 30 in all"):
        plan_iterations(model, list(range(10)), budget=29, iters=0, allocator=uniform)
    dit = DiT(input_size=8, in_channels=1, patch_size=2, hidden_size=32, num_heads=2, depth=4, num_classes=3)
    assert plan_iterations(dit, list(range(5)), budget=20, iters=0, allocator=uniform) == [0] * 5
    with pytest.raises(UsageError, match=r"budget 19 cannot pay for 5 DiT model evaluations .* \(20 needed\); 4 fit"):
        plan_iterations(dit, list(range(5)), budget=19, iters=0, allocator=uniform)


def test_adaptive_spends_within_the_plan_and_less_when_converged():
    model = contractive_fpdm()
    steps = 6
    diffusion = GaussianDiffusion(LinearSchedule(num_train_timesteps=60)).respace(list(range(0, 60, 10)))
    plan = [20] * steps
    result = sample(
        model,
        diffusion,
        generators=[torch.Generator().manual_seed(k) for k in range(3)],
        shape=(1, 8, 8),
        labels=torch.tensor([0, 1, 2]),
        sampler=REGISTRY.create("sampler", "ddpm"),
        solver=REGISTRY.create("solver", "anderson"),
        iterations=plan,
        tol=1e-4,
        adaptive=True,
        reuse=REGISTRY.create("reuse_policy", "reuse"),
    )
    assert (result.blocks <= steps * 2 + sum(plan)).all()
    assert (result.blocks < steps * 2 + sum(plan)).all()  # converged early: unspent iterations remain
    assert all(s.residual_max <= 1e-4 for s in result.steps)


class _Spent:
    """Wraps a solver and records the iterations every sample spent at every step (rows of the batch)."""

    def __init__(self, solver) -> None:  # type: ignore[no-untyped-def]
        self.solver, self.per_step = solver, []

    def solve(self, f, z0, *, max_iter, tol, check_every=1, trace=False):  # type: ignore[no-untyped-def]
        result = self.solver.solve(f, z0, max_iter=max_iter, tol=tol, check_every=check_every, trace=trace)
        self.per_step.append(result.stats.iterations.clone())
        return result


def _adaptive_run(model, allocator, steps, budget, solver="fixed_point", n=3):  # type: ignore[no-untyped-def]
    """DDIM under `budget` with the allocator's plan and tolerances; returns (result, plan, spent per step)."""
    from fpdm.diffusion.sampling import plan_tolerances

    process = GaussianDiffusion(LinearSchedule(num_train_timesteps=200))
    timesteps = sorted(LinearSchedule(num_train_timesteps=200).sampling_timesteps(steps).tolist())
    plan = plan_iterations(model, timesteps[::-1], budget=budget, iters=0, allocator=allocator)
    spy = _Spent(REGISTRY.create("solver", solver))
    result = sample(
        model,
        process.respace(timesteps),
        generators=[torch.Generator().manual_seed(k) for k in range(n)],
        shape=(1, 8, 8),
        labels=torch.arange(n) % 3,
        sampler=REGISTRY.create("sampler", "ddim"),
        solver=spy,
        iterations=plan,
        reuse=REGISTRY.create("reuse_policy", "reuse"),
        tol=plan_tolerances(allocator, plan, timesteps[::-1]),
        adaptive=allocator.tol > 0,
    )
    return result, plan, torch.stack(spy.per_step)  # (steps, B)


@given(
    steps=st.integers(1, 8),
    extra=st.integers(0, 30),
    tol=st.sampled_from([1e-9, 0.05, 0.2, 5.0, 1e6]),
    solver=st.sampled_from(["fixed_point", "anderson"]),
)
def test_adaptive_never_exceeds_the_budget_and_spends_at_least_one_per_step(steps, extra, tol, solver):
    model = contractive_fpdm()
    budget = steps * (model.blocks_per_call(0) + 1) + extra  # anything from what the steps need upwards
    result, plan, spent = _adaptive_run(model, REGISTRY.create("allocator", "adaptive", tol=tol), steps, budget, solver)
    assert (result.blocks <= budget).all() and (spent >= 1).all()
    assert (result.blocks == steps * model.blocks_per_call(0) + spent.sum(0)).all()  # blocks count what was spent
    assert (spent[-1] == sum(plan) - spent[:-1].sum(0)).all()  # the last step spends what the sample saved


@given(steps=st.integers(1, 60), tol=st.floats(1e-6, 10.0))
def test_adaptive_tolerances_follow_the_step_size_and_spare_the_first_and_last_step(steps, tol):
    allocator = REGISTRY.create("allocator", "adaptive", tol=tol)
    timesteps = LinearSchedule().sampling_timesteps(steps).tolist()  # sampling order, high noise first
    tols = allocator.tolerances(allocator.allocate(steps * 4, timesteps), timesteps)
    assert len(tols) == steps and all(0 <= t < math.inf for t in tols)
    assert tols[0] == tols[-1] == 0.0  # cold first step, nothing to save for after the last
    if steps >= 3:
        assert math.isclose(sum(tols), tol * (timesteps[0] - timesteps[-2]) / (timesteps[0] - timesteps[-1]))
        assert max(tols) <= 2 * tol / (steps - 1)  # even spacing: tol / (steps - 1) up to rounding of timesteps


def test_adaptive_stops_early_on_a_fast_map_and_spends_the_savings_later():
    model = contractive_fpdm()  # converges in a few iterations from a warm start
    steps = 8
    budget = steps * (model.blocks_per_call(0) + 6)  # 6 iterations per step
    _, plan, uniform_spent = _adaptive_run(model, REGISTRY.create("allocator", "uniform"), steps, budget)
    result, plan_a, spent = _adaptive_run(model, REGISTRY.create("allocator", "adaptive"), steps, budget)
    assert plan_a == plan == [6] * steps and (uniform_spent == 6).all()
    assert (spent[1:-1] < 6).all()  # warm-started middle steps reach their tolerance early ...
    assert (spent[-1] > 6).all() and (result.blocks == budget).all()  # ... and the last step re-spends it
    assert [s.iterations for s in result.steps] == plan  # the report keeps the plan as the cap


def test_adaptive_that_never_reaches_its_tolerance_is_uniform():
    model = contractive_fpdm()
    steps = 6
    budget = steps * (model.blocks_per_call(0) + 3)  # 3 iterations per step leave residuals far above 1e-30
    uniform, _, uniform_spent = _adaptive_run(model, REGISTRY.create("allocator", "uniform"), steps, budget)
    never, _, never_spent = _adaptive_run(model, REGISTRY.create("allocator", "adaptive", tol=1e-30), steps, budget)
    assert torch.equal(never_spent, uniform_spent) and torch.equal(never.blocks, uniform.blocks)
    torch.testing.assert_close(never.images, uniform.images, rtol=0, atol=1e-5)


def test_bad_tolerances_from_a_plugin_allocator_are_refused():
    from fpdm.diffusion.sampling import plan_tolerances
    from fpdm.errors import PluginError
    from fpdm.interfaces import BudgetAllocator

    class Broken(BudgetAllocator):
        tol = 0.1

        def allocate(self, total_iters, timesteps):  # type: ignore[no-untyped-def]
            return [1] * len(timesteps)

        def tolerances(self, iterations, timesteps):  # type: ignore[no-untyped-def]
            return [math.nan] * len(timesteps)

    assert plan_tolerances(REGISTRY.create("allocator", "uniform"), [2, 2], [9, 0], tol=0.5) == [0.5, 0.5]
    with pytest.raises(PluginError, match="allocator Broken returned tolerances"):
        plan_tolerances(Broken(), [1, 1], [9, 0])


def test_reuse_at_unchanged_x_and_t_costs_no_extra_iterations():
    model = contractive_fpdm()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 500]), torch.tensor([0, 1, 2])
    solver = REGISTRY.create("solver", "fixed_point")
    with torch.no_grad():
        cold = model(x, t, y, iters=100, solver=solver, tol=1e-5)
        warm = model(x, t, y, z0=cold.z, iters=100, solver=solver, tol=1e-5)
    assert cold.stats.converged.all() and (cold.stats.iterations > 1).all()
    assert (warm.stats.iterations <= 1).all() and warm.stats.converged.all()


def _generate(model, n=4, batch_size=4, cfg_scale=1.0, seed=0, reuse="reuse", sampler="ddpm"):  # type: ignore[no-untyped-def]
    diffusion = GaussianDiffusion(LinearSchedule(num_train_timesteps=50)).respace([0, 10, 20, 30, 40, 49])
    return generate(
        model,
        diffusion,
        n=n,
        batch_size=batch_size,
        seed=seed,
        labels=[0, 1, 2],
        shape=(1, 8, 8),
        sampler=REGISTRY.create("sampler", sampler),
        solver=REGISTRY.create("solver", "anderson"),
        iterations=[3] * 6,
        reuse=REGISTRY.create("reuse_policy", reuse),
        cfg_scale=cfg_scale,
    )


def test_same_seed_same_images_whatever_the_batch_size():
    model = contractive_fpdm()
    a, b = _generate(model), _generate(model)
    assert torch.equal(a.images, b.images)
    c = _generate(model, batch_size=3)  # sample k draws its noise from generator (seed, k)
    torch.testing.assert_close(c.images, a.images, rtol=1e-4, atol=1e-5)
    assert not torch.equal(_generate(model, seed=1).images, a.images)


def test_cfg_scale_one_is_the_conditional_model():
    model = contractive_fpdm()
    plain = _generate(model, sampler="ddim")
    nearly = _generate(model, cfg_scale=1.0 + 1e-7, sampler="ddim")  # takes the doubled-batch path
    torch.testing.assert_close(nearly.images, plain.images, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_generate(model, cfg_scale=4.0, sampler="ddim").images, plain.images)


fpdm_cli = run_cli


@pytest.mark.slow
def test_cli_writes_images_grid_stats_and_plot(trained, tmp_path):
    out = tmp_path / "s"
    args = [
        "sample",
        str(trained),
        "--n",
        "6",
        "--batch-size",
        "4",
        "--steps",
        "5",
        "--budget",
        "40",
        "--allocator",
        "increasing",
        "--out",
        str(out),
        "--plot",
        "--no-progress",
    ]
    result = fpdm_cli(*args)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "stats.json", "stats.png"]
    assert len(list((out / "images").iterdir())) == 6
    stats = json.loads((out / "stats.json").read_text())
    assert stats["blocks_per_sample"]["max"] <= 40 and len(stats["per_step"]) == 5
    assert sum(stats["iterations_plan"]) == 40 - 5 * 2
    first = (out / "images" / "000003.png").read_bytes()
    assert fpdm_cli(*args).returncode == 0
    assert (out / "images" / "000003.png").read_bytes() == first  # same seed, same images


@pytest.mark.slow
def test_cli_adaptive_reports_its_tolerances_and_spends_exactly_the_budget(trained, tmp_path):
    out = tmp_path / "a"
    result = fpdm_cli(
        "sample",
        str(trained),
        "--n",
        "3",
        "--steps",
        "5",
        "--budget",
        "40",
        "--allocator",
        "adaptive",
        "--tol",
        "0.3",
        "--out",
        str(out),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "stats.json").read_text())
    tols = stats["tol"]
    assert len(tols) == 5 and tols[0] == tols[-1] == 0.0 and all(0 < t <= 0.3 for t in tols[1:-1])
    assert stats["blocks_per_sample"]["max"] == stats["blocks_per_sample"]["mean"] == 40
    bad = fpdm_cli(
        "sample",
        str(trained),
        "--n",
        "1",
        "--steps",
        "5",
        "--allocator",
        "adaptive",
        "--tol",
        "-1",
        "--out",
        str(tmp_path / "b"),
        "--no-progress",
    )
    assert bad.returncode == 2 and "'tol' must be >= 0" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_library_loads_ema_and_raw_weights(trained):
    ckpt = load_checkpoint(trained)
    ema, raw = load_denoiser(ckpt, registry=REGISTRY), load_denoiser(ckpt, ema=False, registry=REGISTRY)
    assert not ema.training and any(not torch.equal(a, b) for a, b in zip(ema.parameters(), raw.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "5"], "budget 5 cannot pay for 5 FPDM model evaluations"),
        (["--allocator", "nope"], "unknown allocator 'nope'"),
        (
            ["--allocator", "increasing"],
            "allocator 'increasing' spreads a budget over the steps; give a budget (--budget N",
        ),
        (["--reuse", "nope"], "unknown reuse policy 'nope'"),
        (["--sampler", "nope"], "unknown sampler 'nope'"),
        (["--class", "7"], "class id 7 out of range: the model has classes 0..1 (bright, dark)"),
        (["--n", "0"], "n must be >= 1"),
        (["--steps", "5000"], "steps must be in 1..1000"),
        (["--sampler", "ddim", "--eta", "2"], "'eta' must be <= 1"),
        (["--eta", "0.5"], "sampler 'ddpm' has no option 'eta'"),
    ],
)
def test_cli_bad_input_one_line_nothing_written(trained, tmp_path, extra, message):
    out = tmp_path / "bad"
    result = fpdm_cli("sample", str(trained), "--n", "2", "--steps", "5", "--out", str(out), "--no-progress", *extra)
    assert result.returncode == 2, result
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".bad.tmp*"))


@pytest.mark.slow
def test_cli_missing_and_corrupt_checkpoints(tmp_path, trained):
    assert "model not found" in fpdm_cli("sample", str(tmp_path / "none")).stderr
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(trained, broken)
    ckpt = sorted((broken / "checkpoints").iterdir())[-1]
    (ckpt / "ema.safetensors").write_bytes(b"\0" * 10)
    result = fpdm_cli("sample", str(broken), "--n", "1", "--steps", "2", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "checksum mismatch" in result.stderr


class _Oracle(torch.nn.Module):
    """The exact denoiser of a one-image data set: eps = (x_t - sqrt(ac) x*) / sqrt(1 - ac)."""

    num_classes = 0

    def __init__(self, diffusion: GaussianDiffusion, target: torch.Tensor) -> None:
        super().__init__()
        self.diffusion, self.target = diffusion, target

    def blocks_per_call(self, iters: int) -> int:
        return 1

    def forward(self, x, t, y, *, z0=None, iters=0, solver=None, tol=0.0, grad_iters=0):  # type: ignore[no-untyped-def]
        from fpdm.interfaces import DenoiserOutput

        ac = self.diffusion.alphas_cumprod.to(x)[t].view(-1, 1, 1, 1)  # t: training timesteps
        eps = (x - ac.sqrt() * self.target) / (1 - ac).sqrt()
        blocks = torch.ones(len(x), dtype=torch.long)
        return DenoiserOutput(torch.cat([eps, torch.zeros_like(eps)], 1), None, None, blocks)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_samplers_recover_the_data_with_an_exact_denoiser(sampler, steps):
    schedule = LinearSchedule()
    base = GaussianDiffusion(schedule, learn_sigma=True)
    target = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)
    diffusion = base.respace(sorted(schedule.sampling_timesteps(steps).tolist()))
    result = sample(
        _Oracle(base, target),
        diffusion,
        generators=[torch.Generator().manual_seed(k) for k in range(3)],
        shape=(1, 8, 8),
        labels=None,
        sampler=REGISTRY.create("sampler", sampler),
        solver=None,
        iterations=[0] * steps,
        reuse=REGISTRY.create("reuse_policy", "cold"),
    )
    torch.testing.assert_close(result.images, target.expand(3, -1, -1, -1), atol=2e-4, rtol=0)


@pytest.mark.slow
def test_dit_unconditional_run_samples_within_budget_and_refuses_guidance(images, tmp_path):
    from fpdm.training.loop import train
    from support import tiny_config

    run = tmp_path / "dit"
    train(
        tiny_config(
            images, run, "model.arch=DiT-XS/2", "model.depth=2", "data.class_conditional=false", "train.steps=2"
        ),
        registry=REGISTRY,
        progress=False,
    )
    ok = fpdm_cli(
        "sample", str(run), "--n", "3", "--steps", "4", "--budget", "9", "--out", str(tmp_path / "o"), "--no-progress"
    )
    assert ok.returncode == 0, ok.stderr
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["blocks_per_sample"]["max"] == 8  # 4 steps x depth 2 within 9
    refused = fpdm_cli("sample", str(run), "--n", "1", "--steps", "2", "--cfg-scale", "3")
    assert refused.returncode == 2 and "unconditional" in refused.stderr
    too_small = fpdm_cli("sample", str(run), "--n", "1", "--steps", "5", "--budget", "9")
    assert too_small.returncode == 2 and "(10 needed); 4 fit: lower --steps" in too_small.stderr


# --------------------------------------------------------------------------------------------------------------
# One model evaluation, one sampler protocol


def _process(steps: int = 4, *, prediction: str = "eps") -> GaussianDiffusion:
    schedule = LinearSchedule(num_train_timesteps=100)
    timesteps = sorted(schedule.sampling_timesteps(steps).tolist())
    return GaussianDiffusion(schedule, prediction=prediction).respace(timesteps)


def _gens(n: int = 3) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(10 + k) for k in range(n)]


def _sample(model, diffusion, sampler, **options):  # type: ignore[no-untyped-def]
    n = options.pop("n", 3)
    labels = torch.arange(n) % 3 if getattr(model, "num_classes", 0) else None
    plan = options.pop("iterations", [3] * diffusion.num_timesteps)
    return sample(
        model,
        diffusion,
        generators=_gens(n),
        shape=(1, 8, 8),
        labels=labels,
        sampler=sampler,
        solver=options.pop("solver", REGISTRY.create("solver", "fixed_point")),
        iterations=plan,
        reuse=options.pop("reuse", REGISTRY.create("reuse_policy", "reuse")),
        **options,
    )


class _BlockCounter:
    """Wraps a denoiser's blocks in forward hooks: every block evaluation of every model call adds the rows it
    ran on, whatever the solver restricted or the guidance doubled."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows = 0
        self.handles = [block.register_forward_hook(self._seen) for block in model.block_modules()]

    def _seen(self, module, args, output) -> None:  # type: ignore[no-untyped-def]
        self.rows += args[0].shape[0]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("case", ["fixed", "adaptive", "guided", "dit"])
def test_every_block_that_runs_is_a_block_reported(case):
    if case == "dit":
        torch.manual_seed(0)
        model = DiT(input_size=8, in_channels=1, patch_size=2, hidden_size=32, num_heads=2, depth=3, num_classes=3)
    else:
        model = contractive_fpdm(pre_depth=1, post_depth=2)
    diffusion = _process(5)
    options = {
        "adaptive": {
            "solver": REGISTRY.create("solver", "anderson"),
            "tol": 1e-3,
            "adaptive": True,
            "iterations": [8] * 5,
        },
        "guided": {"cfg_scale": 3.0},
    }.get(case, {})
    counter = _BlockCounter(model)
    try:
        result = _sample(model, diffusion, REGISTRY.create("sampler", "ddpm"), **options)
    finally:
        counter.close()
    rows_per_sample = 2 if case == "guided" else 1  # guidance runs every sample twice; reports count it once
    assert counter.rows == rows_per_sample * int(result.blocks.sum()) > 0
    if case == "adaptive":  # samples stopped on their own: the counts differ from the fixed plan
        assert (result.blocks < 5 * 3 + 40).all()


def _old_style_ddim(diffusion, model_output, x, i, *, noise, clip_x0):  # type: ignore[no-untyped-def]
    """DDIM (eta 0) as a step-update plugin was written before samplers ran over the model evaluation."""
    t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
    pred, _ = diffusion.split_output(model_output, x)
    x0 = diffusion.predict_x0(pred, x, t)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    eps = (diffusion.extract("sqrt_recip_alphas_cumprod", t, x) * x - x0) / diffusion.extract(
        "sqrt_recipm1_alphas_cumprod", t, x
    )
    ac_prev = diffusion.extract("alphas_cumprod_prev", t, x)
    return x0 * torch.sqrt(ac_prev) + torch.sqrt((1 - ac_prev).clamp_min(0)) * eps


@pytest.mark.parametrize("clip_x0", [False, True])
def test_an_old_style_step_update_plugin_still_samples_through_the_adapter(clip_x0):
    import types

    from fpdm import hookimpl
    from fpdm.registry import Registry

    plugin = types.ModuleType("oldstyle_sampler")
    plugin.register_samplers = hookimpl(lambda register: register("old_ddim", lambda: _old_style_ddim))
    registry = Registry()
    assert registry.add_plugin(plugin, name="oldstyle").error is None
    model, diffusion = contractive_fpdm(), _process(4)
    old = _sample(model, diffusion, registry.create("sampler", "old_ddim"), clip_x0=clip_x0, cfg_scale=2.0)
    new = _sample(model, diffusion, REGISTRY.create("sampler", "ddim"), clip_x0=clip_x0, cfg_scale=2.0)
    assert torch.equal(old.images, new.images) and torch.equal(old.blocks, new.blocks)
    assert [s.residual_max for s in old.steps] == [s.residual_max for s in new.steps]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("clip_x0", [False, True])
def test_x0_and_eps_are_consistent_with_x_t(prediction, clip_x0):
    from fpdm.interfaces import Sampler

    seen = []

    class Recording(Sampler):
        def __call__(self, evaluate, x, diffusion, *, noise):  # type: ignore[no-untyped-def]
            for i in reversed(range(diffusion.num_timesteps)):
                d = evaluate(x, i)
                seen.append((x, i, d))
                x = d.x0 + 0.1 * d.eps  # any update: the contract is per evaluation
            return x

    model, diffusion = contractive_fpdm(), _process(4, prediction=prediction)
    _sample(model, diffusion, Recording(), clip_x0=clip_x0)
    assert len(seen) == 4
    for x, i, d in seen:
        ac = diffusion.alphas_cumprod[i].float()
        torch.testing.assert_close(ac.sqrt() * d.x0 + (1 - ac).sqrt() * d.eps, x, rtol=1e-4, atol=1e-4)
        assert d.output.shape == (3, 2, 8, 8)  # learned variance channels ride along for DDPM
        assert not clip_x0 or d.x0.abs().max() <= 1


def test_the_plan_and_the_warm_start_are_per_evaluation_not_per_step():
    from fpdm.interfaces import Sampler

    class TwoPerStep(Sampler):
        order = 2

        def levels(self, diffusion):  # type: ignore[no-untyped-def]
            return [i for i in reversed(range(diffusion.num_timesteps)) for _ in range(2)]

        def __call__(self, evaluate, x, diffusion, *, noise):  # type: ignore[no-untyped-def]
            for i in reversed(range(diffusion.num_timesteps)):
                first = evaluate(x, i).x0
                x0 = (first + evaluate(x, i).x0) / 2  # same x and t again: a warm start has nothing to do
                ac_prev = diffusion.alphas_cumprod_prev[i].float()
                x = ac_prev.sqrt() * x0
            return x

    model, diffusion = contractive_fpdm(), _process(3)
    plan = [20, 7, 20, 6, 20, 5]
    result = _sample(
        model, diffusion, TwoPerStep(), iterations=plan, tol=1e-5, solver=REGISTRY.create("solver", "anderson")
    )
    assert [s.iterations for s in result.steps] == plan and [s.index for s in result.steps] == list(range(6))
    assert all(s.iterations_max <= 1 for s in result.steps[1::2])  # the repeat starts from its own solution
    assert (result.blocks == sum(s.iterations_mean for s in result.steps) + 6 * 2).all()
    with pytest.raises(UsageError, match="3 iteration counts for 3 steps \\(6 model evaluations\\)"):
        _sample(model, diffusion, TwoPerStep(), iterations=[2, 2, 2])


def test_a_sampler_that_breaks_the_protocol_is_named():
    from fpdm.errors import PluginError
    from fpdm.interfaces import Sampler

    class Greedy(Sampler):  # declares one evaluation per step, makes two
        def __call__(self, evaluate, x, diffusion, *, noise):  # type: ignore[no-untyped-def]
            for i in reversed(range(diffusion.num_timesteps)):
                x = evaluate(evaluate(x, i).x0, i).x0
            return x

    class Skipping(Sampler):  # asks for the second draw first
        def __call__(self, evaluate, x, diffusion, *, noise):  # type: ignore[no-untyped-def]
            return x + noise(1)

    class Lazy(Sampler):  # never calls the model
        def __call__(self, evaluate, x, diffusion, *, noise):  # type: ignore[no-untyped-def]
            return x

    model, diffusion = contractive_fpdm(), _process(2)
    with pytest.raises(PluginError, match="asked for model evaluation 3; the plan has 2"):
        _sample(model, diffusion, Greedy())
    with pytest.raises(PluginError, match="noise draw 1 after 0 draws"):
        _sample(model, diffusion, Skipping())
    with pytest.raises(PluginError, match="made 0 model evaluations; the plan has 2"):
        _sample(model, diffusion, Lazy())


@pytest.mark.parametrize("at, where", [(1, "the sampler update"), (2, "the sampler update"), (0, "the model output")])
def test_divergence_names_the_evaluation_and_the_part(at, where):
    from fpdm.errors import FpdmRuntimeError
    from fpdm.interfaces import Sampler

    class Exploding(Sampler):
        def __call__(self, evaluate, x, diffusion, *, noise):  # type: ignore[no-untyped-def]
            for k, i in enumerate(reversed(range(diffusion.num_timesteps))):
                x = evaluate(x, i).x0
                if k == at and where == "the sampler update":
                    x = x / 0.0
            return x

    model, diffusion = contractive_fpdm(), _process(3)
    if where == "the model output":
        torch.nn.init.constant_(model.final_layer.linear.bias, math.inf)
    with pytest.raises(
        FpdmRuntimeError,
        match=rf"sampling diverged at model evaluation {at + 1} of 3 \(timestep \d+\): "
        rf"non-finite values in {where}, fixed-point residual max",
    ):
        _sample(model, diffusion, Exploding())


def test_the_exported_loop_module_runs_the_same_sampler_as_sample():
    """The whole-loop graph's module in PyTorch, fed the draws `sample` makes, gives `sample`'s images."""
    from fpdm.diffusion.sampling import step_noise
    from fpdm.export.loop import SamplingLoop

    model, diffusion = contractive_fpdm(), _process(4)
    for name, options in [("ddpm", {}), ("ddim", {"eta": 0.5}), ("ddim", {})]:
        sampler = REGISTRY.create("sampler", name, **options)
        reuse, solver = REGISTRY.create("reuse_policy", "extrapolate"), REGISTRY.create("solver", "anderson")
        want = _sample(model, diffusion, sampler, reuse=reuse, solver=solver, cfg_scale=2.0, iterations=[2] * 4)
        gens = _gens()
        x_T = step_noise(gens, (1, 8, 8), torch.device("cpu"))
        noise = torch.stack([step_noise(gens, (1, 8, 8), torch.device("cpu")) for _ in range(4)])  # (S, B, C, H, W)
        loop = SamplingLoop(
            model, diffusion, sampler=sampler, solver=solver, iterations=[2] * 4, reuse=reuse, cfg_scale=2.0
        )
        with torch.no_grad():
            images, residual = loop(x_T, torch.arange(3) % 3, noise)
        torch.testing.assert_close(images, want.images, rtol=0, atol=1e-5)
        assert residual.shape == (4, 3)
        torch.testing.assert_close(
            residual.max(1).values.double(),
            torch.tensor([s.residual_max for s in want.steps], dtype=torch.float64),
            rtol=0.05,
            atol=1e-6,
        )  # residuals near 1e-5: float32 rounding shows


def test_extrapolation_scales_with_uneven_levels_and_restarts_from_a_repeated_level():
    policy = REGISTRY.create("reuse_policy", "extrapolate", gamma=0.5)
    z2, z1 = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
    even = policy.warm_start([z2, z1], 2, levels=[900.0, 800.0], level=700.0)
    torch.testing.assert_close(even, policy.init([z2, z1], 2))  # even steps: the old rule, z1 + gamma (z1 - z2)
    uneven = policy.warm_start([z2, z1], 2, levels=[900.0, 800.0], level=600.0)  # twice as far: twice the step
    torch.testing.assert_close(uneven, torch.full((1, 2, 3), 2.0))
    assert policy.warm_start([z2, z1], 2, levels=[900.0, 800.0], level=800.0) is z1  # Heun's repeat
