"""The diffusion process against answers computed independently: schedules from their closed forms, the
forward process by Monte Carlo, prediction conversions by round trip, the posterior from Ho et al. eq. 7,
the variational bound at a perfect model, respacing, and the registered schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from fpdm.diffusion.gaussian import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl
from fpdm.errors import UsageError
from fpdm.plugins.schedules import CosineSchedule, LinearSchedule
from fpdm.registry import Registry

T_SMALL = 50


def linear_process(prediction: str = "eps", learn_sigma: bool = True, T: int = T_SMALL) -> GaussianDiffusion:
    return GaussianDiffusion(
        LinearSchedule(num_train_timesteps=T, beta_end=0.2), prediction=prediction, learn_sigma=learn_sigma
    )


# ---------------------------------------------------------------------------------------------------- schedules


@given(T=st.integers(1, 1200), start=st.floats(1e-5, 0.01), span=st.floats(0.0, 0.05))
def test_linear_alphas_cumprod_is_cumprod_of_one_minus_linspace(T, start, span):
    schedule = LinearSchedule(num_train_timesteps=T, beta_start=start, beta_end=start + span)
    expected = np.cumprod(1.0 - np.linspace(start, start + span, T, dtype=np.float64))
    betas = schedule.betas()
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    np.testing.assert_allclose(schedule.alphas_cumprod().numpy(), expected, rtol=1e-12, atol=0)


@given(T=st.integers(2, 1000), s=st.floats(0.0, 0.1))
def test_cosine_alphas_cumprod_is_closed_form_ratio_until_the_clip(T, s):
    schedule = CosineSchedule(num_train_timesteps=T, s=s)

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    ac = schedule.alphas_cumprod().tolist()
    for i in range(T):
        if 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T) > 0.999:  # the clip acts from here on
            assert i > 0
            break
        assert ac[i] == pytest.approx(alpha_bar((i + 1) / T) / alpha_bar(0.0), abs=1e-10)
    assert schedule.betas().max() <= 0.999


@pytest.mark.parametrize("schedule_cls", [LinearSchedule, CosineSchedule])
@pytest.mark.parametrize("T", [2, 3, 1000])
def test_zero_terminal_snr_rescale(schedule_cls, T):
    plain = schedule_cls(num_train_timesteps=T).alphas_cumprod()
    rescaled = schedule_cls(num_train_timesteps=T, zero_terminal_snr=True).alphas_cumprod()
    assert rescaled[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert rescaled[0].item() == pytest.approx(plain[0].item(), abs=1e-12)
    assert bool((rescaled[1:] < rescaled[:-1]).all())
    # Algorithm 1 is affine in sqrt(alphas_cumprod): the normalised shape is that of the plain schedule.
    root, new_root = plain.sqrt(), rescaled.sqrt()
    torch.testing.assert_close((root - root[-1]) / (root[0] - root[-1]), new_root / new_root[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "factory, options",
    [
        (LinearSchedule, {"num_train_timesteps": 0}),
        (LinearSchedule, {"beta_start": 0.0}),
        (LinearSchedule, {"beta_end": 1.0}),
        (LinearSchedule, {"beta_start": 0.1, "beta_end": 0.01}),
        (LinearSchedule, {"num_train_timesteps": 1, "zero_terminal_snr": True}),
        (CosineSchedule, {"max_beta": 1.5}),
        (CosineSchedule, {"s": -0.1}),
        (CosineSchedule, {"zero_terminal_snr": "yes"}),
    ],
)
def test_bad_schedule_options_are_rejected(factory, options):
    with pytest.raises((ValueError, TypeError)):
        factory(**options)


def test_eps_prediction_at_zero_terminal_snr_is_a_usage_error():
    schedule = LinearSchedule(num_train_timesteps=10, zero_terminal_snr=True)
    with pytest.raises(UsageError, match="prediction='v'"):
        GaussianDiffusion(schedule)
    losses = GaussianDiffusion(schedule, prediction="v").training_losses(
        lambda x, t: torch.zeros(2, 2, 3, dtype=torch.float64),
        torch.zeros(2, 1, 3, dtype=torch.float64),
        torch.tensor([9, 0]),
    )
    assert all(bool(torch.isfinite(value).all()) for value in losses.values())


def test_unknown_prediction_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown prediction 'x0'"):
        GaussianDiffusion(LinearSchedule(), prediction="x0")


def test_process_tables_match_the_schedule():
    schedule = CosineSchedule(num_train_timesteps=100)
    process = GaussianDiffusion(schedule)
    assert process.num_timesteps == 100
    assert process.betas.dtype == torch.float64
    torch.testing.assert_close(process.alphas_cumprod, schedule.alphas_cumprod(), rtol=0, atol=0)
    assert torch.equal(process.timestep_map, torch.arange(100))
    assert process.alphas_cumprod_prev[0] == 1 and torch.equal(
        process.alphas_cumprod_prev[1:], process.alphas_cumprod[:-1]
    )


# ---------------------------------------------------------------------------------------------------- forward process


@pytest.mark.parametrize("t", [0, 17, 49])
def test_q_sample_moments_by_monte_carlo(t):
    process = linear_process()
    draws = 20000
    x0 = torch.tensor([[-1.0, -0.3, 0.0, 0.8]], dtype=torch.float64).expand(draws, 4)
    xt = process.q_sample(x0, torch.full((draws,), t), torch.randn(draws, 4, dtype=torch.float64))
    ac = process.alphas_cumprod[t].item()
    var = 1 - ac
    # Sample mean has standard error sqrt(var / n); sample variance sqrt(2 var^2 / n). Allow 5 sigma.
    torch.testing.assert_close(xt.mean(0), math.sqrt(ac) * x0[0], rtol=0, atol=5 * math.sqrt(var / draws))
    torch.testing.assert_close(
        xt.var(0), torch.full((4,), var, dtype=torch.float64), rtol=0, atol=5 * var * math.sqrt(2 / draws)
    )


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4))
def test_q_sample_is_the_closed_form(seed, batch):
    process = linear_process()
    gen = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, batch, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.randint(0, T_SMALL, (batch,), generator=gen)
    ac = torch.tensor([process.alphas_cumprod[i].item() for i in t.tolist()], dtype=torch.float64).view(-1, 1, 1, 1)
    assert torch.equal(
        process.q_sample(x0, t, noise),
        process.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0
        + process.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1) * noise,
    )
    torch.testing.assert_close(
        process.q_sample(x0, t, noise), ac.sqrt() * x0 + (1 - ac).sqrt() * noise, rtol=1e-14, atol=1e-14
    )


def test_tables_follow_the_data_dtype_and_device():
    process = linear_process()
    x = torch.randn(3, 2, 5, dtype=torch.float32)
    out = process.q_sample(x, torch.tensor([0, 1, 2]), torch.randn_like(x))
    assert out.dtype == torch.float32
    assert process.extract("betas", torch.tensor([0, 1, 2]), x).shape == (3, 1, 1)
    with pytest.raises(UsageError, match="t must have shape"):
        process.q_sample(x, torch.tensor([0, 1]), x)


# ---------------------------------------------------------------------------------------------------- conversions


@given(
    prediction=st.sampled_from(["eps", "v"]),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    schedule=st.sampled_from([LinearSchedule(num_train_timesteps=1000), CosineSchedule(num_train_timesteps=1000)]),
)
def test_predictions_invert_the_target(prediction, shape, batch, seed, schedule):
    process = GaussianDiffusion(schedule, prediction=prediction)
    gen = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, batch, *shape, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    xt = process.q_sample(x0, t, noise)
    target = process.target(x0, noise, t)
    # eps recovers x0 through 1 / sqrt(ac) (up to ~250 for cosine at t = 999): relative error scales with it.
    torch.testing.assert_close(process.predict_x0(target, xt, t), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(process.predict_eps(target, xt, t), noise, rtol=1e-9, atol=1e-9)


def test_v_target_is_salimans_and_ho():
    process = linear_process(prediction="v")
    x0, noise, t = (
        torch.randn(4, 3, dtype=torch.float64),
        torch.randn(4, 3, dtype=torch.float64),
        torch.tensor([0, 5, 20, 49]),
    )
    a = process.alphas_cumprod[t].sqrt().unsqueeze(1)
    torch.testing.assert_close(process.target(x0, noise, t), a * noise - (1 - a**2).sqrt() * x0)


# ---------------------------------------------------------------------------------------------------- posterior


@given(seed=st.integers(0, 2**31 - 1), t_value=st.integers(0, T_SMALL - 1))
def test_q_posterior_is_ho_eq_7(seed, t_value):
    process = linear_process()
    gen = torch.Generator().manual_seed(seed)
    x0, xt = torch.randn(2, 2, 3, 4, generator=gen, dtype=torch.float64)
    t = torch.full((2,), t_value)
    betas = np.linspace(1e-4, 0.2, T_SMALL)
    ac = np.cumprod(1 - betas)
    ac_prev = 1.0 if t_value == 0 else ac[t_value - 1]
    beta, alpha = betas[t_value], 1 - betas[t_value]
    mean_expected = (
        math.sqrt(ac_prev) * beta / (1 - ac[t_value]) * x0 + math.sqrt(alpha) * (1 - ac_prev) / (1 - ac[t_value]) * xt
    )
    var_expected = (1 - ac_prev) / (1 - ac[t_value]) * beta
    mean, var, log_var = process.q_posterior(x0, xt, t)
    torch.testing.assert_close(mean, mean_expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, torch.full_like(xt, var_expected), rtol=1e-10, atol=1e-15)
    clipped = var_expected if t_value > 0 else (1 - ac[0]) / (1 - ac[1]) * betas[1]
    torch.testing.assert_close(log_var, torch.full_like(xt, math.log(clipped)), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- KL and likelihood


def test_normal_kl_known_values():
    m, lv = torch.tensor([0.3, -2.0], dtype=torch.float64), torch.tensor([0.1, -1.0], dtype=torch.float64)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(2, dtype=torch.float64))
    # KL(N(1, 1) || N(0, 4)) = log 2 + (1 + 1) / 8 - 1/2
    kl = normal_kl(
        torch.tensor(1.0, dtype=torch.float64),
        torch.tensor(0.0, dtype=torch.float64),
        torch.tensor(0.0, dtype=torch.float64),
        torch.tensor(math.log(4.0), dtype=torch.float64),
    )
    assert kl.item() == pytest.approx(math.log(2) + 2 / 8 - 0.5, rel=1e-12)


def test_discretized_likelihood_is_a_distribution_over_the_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, std in [(0.0, 0.01), (0.95, 0.3), (-3.0, 1.0)]:
        logp = discretized_gaussian_log_likelihood(
            bins, mean=torch.full_like(bins, mean), log_scale=torch.full_like(bins, math.log(std))
        )
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # The mass of one interior bin, from math.erf.
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    x, mean, std = bins[100].item(), 0.1, 0.2
    expected = math.log(phi((x + 1 / 255 - mean) / std) - phi((x - 1 / 255 - mean) / std))
    got = discretized_gaussian_log_likelihood(
        bins[100:101],
        mean=torch.tensor([mean], dtype=torch.float64),
        log_scale=torch.tensor([math.log(std)], dtype=torch.float64),
    )
    assert got.item() == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------------------------------------------- losses


def perfect_model(process: GaussianDiffusion, x0: Tensor, noise: Tensor, t: Tensor, v_values: float = -1.0):
    """A model that predicts the true target and, with v = -1, the posterior's log variance."""

    def fn(xt: Tensor, t_model: Tensor) -> Tensor:
        assert torch.equal(t_model, process.timestep_map[t])
        pred = process.target(x0, noise, t)
        return torch.cat([pred, torch.full_like(pred, v_values)], 1) if process.learn_sigma else pred

    return fn


@given(prediction=st.sampled_from(["eps", "v"]), seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4))
def test_losses_vanish_for_a_perfect_model_away_from_t0(prediction, seed, batch):
    process = linear_process(prediction)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(batch, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.randint(1, T_SMALL, (batch,), generator=gen)
    losses = process.training_losses(perfect_model(process, x0, noise, t), x0, t, noise=noise)
    assert set(losses) == {"mse", "vb", "loss"}
    assert all(value.shape == (batch,) for value in losses.values())
    torch.testing.assert_close(losses["mse"], torch.zeros(batch, dtype=torch.float64), rtol=0, atol=1e-20)
    torch.testing.assert_close(losses["vb"], torch.zeros(batch, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"], rtol=0, atol=0)


def test_vb_is_positive_for_a_wrong_variance_and_the_decoder_nll_at_t0():
    process = linear_process()
    x0 = torch.rand(3, 2, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 30])
    losses = process.training_losses(perfect_model(process, x0, noise, t, v_values=0.5), x0, t, noise=noise)
    assert bool((losses["vb"] > 0).all()) and bool(torch.isfinite(losses["vb"]).all())
    # At t = 0 the term is the decoder NLL in bits per dim: -log2 of the mass of x0's bin under the model.
    out = process.p_mean_variance(
        perfect_model(process, x0, noise, t, 0.5)(None, process.timestep_map[t]), process.q_sample(x0, t, noise), t
    )
    nll = -discretized_gaussian_log_likelihood(x0, mean=out["mean"], log_scale=0.5 * out["log_variance"])
    assert losses["vb"][0].item() == pytest.approx(nll[0].mean().item() / math.log(2), rel=1e-12)
    torch.testing.assert_close(out["mean"][0], x0[0])  # the posterior mean at t = 0 is x0 itself


def test_vb_trains_only_the_variance_and_mse_only_the_prediction():
    process = linear_process()
    x0, t = torch.rand(2, 2, 3) * 2 - 1, torch.tensor([3, 40])
    output = torch.randn(2, 4, 3, requires_grad=True)
    losses = process.training_losses(lambda xt, tm: output * 1.0, x0, t)
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), output, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), output)
    assert bool((grad_vb[:, :2] == 0).all()) and bool((grad_vb[:, 2:] != 0).any())
    assert bool((grad_mse[:, 2:] == 0).all()) and bool((grad_mse[:, :2] != 0).any())
    assert losses["loss"].dtype == torch.float32


def test_fixed_variance_returns_mse_only_and_the_small_posterior_variance():
    process = linear_process(learn_sigma=False)
    x0 = torch.rand(2, 3, 4, dtype=torch.float64)
    t = torch.tensor([0, 20])
    losses = process.training_losses(lambda xt, tm: torch.zeros_like(xt), x0, t)
    assert set(losses) == {"mse", "loss"} and torch.equal(losses["loss"], losses["mse"])
    out = process.p_mean_variance(torch.zeros_like(x0), x0, t)
    torch.testing.assert_close(
        out["variance"][1], torch.full((3, 4), process.posterior_variance[20].item(), dtype=torch.float64)
    )
    torch.testing.assert_close(
        out["log_variance"][0],
        torch.full((3, 4), process.posterior_log_variance_clipped[0].item(), dtype=torch.float64),
    )


def test_learned_variance_interpolates_between_posterior_and_beta():
    process = linear_process()
    xt, t = torch.zeros(1, 1, 2, dtype=torch.float64), torch.tensor([25])
    logs = [
        process.p_mean_variance(torch.cat([xt, torch.full_like(xt, v)], 1), xt, t)["log_variance"][0, 0, 0].item()
        for v in (-1.0, 0.0, 1.0)
    ]
    low, high = process.posterior_log_variance_clipped[25].item(), math.log(process.betas[25].item())
    assert logs == pytest.approx([low, (low + high) / 2, high], rel=1e-12)


@pytest.mark.parametrize("learn_sigma, channels", [(True, 3), (True, 2), (False, 6)])
def test_wrong_channel_count_is_a_clear_error(learn_sigma, channels):
    process = linear_process(learn_sigma=learn_sigma)
    x0 = torch.zeros(2, 3, 4)
    with pytest.raises(UsageError, match=r"expected \(2, \d, 4\).*learn_sigma"):
        process.training_losses(lambda xt, tm: torch.zeros(2, channels, 4), x0, torch.tensor([1, 2]))


def test_clip_x0_clamps_the_prediction():
    process = linear_process(learn_sigma=False)
    xt, t = torch.full((1, 1, 3), 5.0, dtype=torch.float64), torch.tensor([30])
    assert process.p_mean_variance(torch.zeros_like(xt), xt, t)["pred_x0"].max() > 1
    assert process.p_mean_variance(torch.zeros_like(xt), xt, t, clip_x0=True)["pred_x0"].abs().max() <= 1


# ---------------------------------------------------------------------------------------------------- respacing


@given(data=st.data(), prediction=st.sampled_from(["eps", "v"]), learn_sigma=st.booleans())
def test_respace_keeps_alphas_cumprod_at_the_chosen_timesteps(data, prediction, learn_sigma):
    process = GaussianDiffusion(CosineSchedule(num_train_timesteps=200), prediction=prediction, learn_sigma=learn_sigma)
    subset = sorted(data.draw(st.sets(st.integers(0, 199), min_size=1, max_size=30)))
    spaced = process.respace(subset)
    assert spaced.num_timesteps == len(subset)
    assert (spaced.prediction, spaced.learn_sigma) == (prediction, learn_sigma)
    assert torch.equal(spaced.timestep_map, torch.tensor(subset))
    torch.testing.assert_close(spaced.alphas_cumprod, process.alphas_cumprod[subset], rtol=1e-12, atol=0)
    # Respacing again composes: indices of the respaced process map to the original timesteps.
    inner = data.draw(st.sets(st.integers(0, len(subset) - 1), min_size=1))
    twice = spaced.respace(sorted(inner))
    assert torch.equal(twice.timestep_map, torch.tensor([subset[i] for i in sorted(inner)]))
    torch.testing.assert_close(twice.alphas_cumprod, process.alphas_cumprod[twice.timestep_map], rtol=1e-12, atol=0)


def test_respaced_process_calls_the_model_with_original_timesteps():
    process = linear_process().respace([0, 10, 49])
    seen = []
    x0 = torch.zeros(3, 1, 2)
    process.training_losses(lambda xt, tm: seen.append(tm) or torch.zeros(3, 2, 2), x0, torch.tensor([2, 1, 0]))
    assert seen[0].tolist() == [49, 10, 0]
    assert process.respace(torch.tensor([0, 2])).timestep_map.tolist() == [0, 49]


@pytest.mark.parametrize(
    "subset, message",
    [
        ([], "empty"),
        ([3, 1], "increasing"),
        ([1, 1], "increasing"),
        ([0, 50], r"0\.\.49"),
        ([-1, 2], r"0\.\.49"),
        (["a", 2], "numbers"),
        ([0.5, float("nan")], "finite"),
        ([0.5, 49.5], r"0\.\.49"),
    ],
)
def test_bad_respace_subsets_are_usage_errors(subset, message):
    with pytest.raises(UsageError, match=message):
        linear_process().respace(subset)


def test_fractional_respacing_interpolates_log_sigma_and_keeps_whole_steps_exact():
    process = linear_process()
    logs = 0.5 * torch.log((1 - process.alphas_cumprod) / process.alphas_cumprod)
    half = process.respace([0.0, 2.5, 7.0])
    assert half.timestep_map.dtype == torch.float64 and half.timestep_map.tolist() == [0.0, 2.5, 7.0]
    got = 0.5 * torch.log((1 - half.alphas_cumprod) / half.alphas_cumprod)
    torch.testing.assert_close(got, torch.stack([logs[0], (logs[2] + logs[3]) / 2, logs[7]]), rtol=1e-12, atol=0)
    whole = process.respace([0.0, 3.0])  # integral floats are whole steps: exact tables, an int64 map
    assert whole.timestep_map.dtype == torch.int64
    assert whole.alphas_cumprod.tolist() == process.alphas_cumprod[[0, 3]].tolist()


# ---------------------------------------------------------------------------------------------------- registry


def test_schedules_are_registered_and_build_with_options():
    registry = Registry.load(only=[])
    assert {"linear", "cosine"} <= set(registry.names("schedule"))
    linear = registry.create("schedule", "linear", num_train_timesteps=10, beta_end=0.05, zero_terminal_snr=True)
    assert linear == LinearSchedule(num_train_timesteps=10, beta_end=0.05, zero_terminal_snr=True)
    assert registry.create("schedule", "cosine", s=0.01).betas().shape == (1000,)
    assert registry.entry("schedule", "cosine").description
    with pytest.raises(UsageError, match="has no option 'beta_max'"):
        registry.create("schedule", "linear", beta_max=0.1)
    with pytest.raises(UsageError, match="bad option"):
        registry.create("schedule", "cosine", max_beta=2.0)
