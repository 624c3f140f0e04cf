"""The sampler contract (`fpdm.interfaces.Sampler`): the declared order of accuracy, determinism, the declared
model evaluations and noise draws, and finite samples under zero terminal SNR.

The oracle is Gaussian data, x0 ~ N(mu, s^2) independently per channel (a different mu and s in each). Under
x_t = alpha x0 + sigma eps the marginal at (alpha, sigma) is N(alpha mu, alpha^2 s^2 + sigma^2), the exact
denoiser is E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu), and the probability-flow
ODE carries x along the affine map between two marginals. `GaussianModel` is the `evaluate(x, t)` samplers
call: that denoiser at the respaced process's level t (classifier-free guidance emulated as
uncond + w (cond - uncond) over two such Gaussians), returning Denoised(x0, the eps consistent with x and x0,
the eps or v prediction as output), and recording every call.

The order contract runs on a continuous schedule (`continuous`) in float64; the property contracts draw step
counts, spacings (`fpdm.spacing.SPACINGS`, karras included) and guidance scales under hypothesis, over fpdm's
linear schedule respaced as sampling does it (`respacer`), in float32.

Every contract takes `make(**options) -> Sampler`. The order contract builds the sampler with
lower_order_warmup=False and lower_order_final=False when it accepts them (the start and end of a multistep
run at lowered order would cost it its nominal order), and otherwise with `make()`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.errors import UsageError
from fpdm.interfaces import Denoised, Sampler
from fpdm.registry import Registry
from fpdm.spacing import SPACINGS
from fpdm.testing.suite import Make, given, skip, strategies

SHAPE = (3, 2, 2)  # (C, H, W) of one sample: three channels, three Gaussians
ORDER_STEPS = (8, 16, 32, 64)
REFERENCE_STEPS = 4096
SLACK = 0.3  # the fitted slope may fall this far below the declared order
SIGMA_MAX, SIGMA_MIN = 5.0, 0.1  # EDM sigmas (sigma / alpha) of the order test's continuous schedule
GUIDANCE = 4.0  # the guided order case's scale (DiT's default)


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """x0 ~ N(mu, s^2) per channel: mu and s float64 of shape (1, C, 1, 1), to broadcast against (B, C, H, W)."""

    mu: Tensor
    s: Tensor

    @classmethod
    def of(cls, mu: Sequence[float], s: Sequence[float]) -> Gaussian:
        shape = (1, len(mu), *([1] * (len(SHAPE) - 1)))
        return cls(torch.tensor(mu, dtype=torch.float64).view(shape), torch.tensor(s, dtype=torch.float64).view(shape))

    def denoiser(self, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """E[x0 | x_t = x] = shift + gain x at the level (alpha, sigma): (shift, gain)."""
        gain = alpha * self.s**2 / (alpha**2 * self.s**2 + sigma**2)
        return self.mu * (1.0 - alpha * gain), gain

    def denoise(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        shift, gain = self.denoiser(alpha, sigma)
        return shift + gain * x

    def flow(self, x: Tensor, source: tuple[float, float], target: tuple[float, float]) -> Tensor:
        """The exact probability-flow map of x from level source = (alpha, sigma) to target: the affine map
        between the two marginals."""
        (a, b), (c, d) = source, target
        scale = torch.sqrt(c**2 * self.s**2 + d**2) / torch.sqrt(a**2 * self.s**2 + b**2)
        return c * self.mu + scale * (x - a * self.mu)

    def marginal(self, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """(mean, variance) of x_t at (alpha, sigma)."""
        return alpha * self.mu, alpha**2 * self.s**2 + sigma**2

    def draw(self, batch: int, alpha: float, sigma: float, seed: int) -> Tensor:
        """(batch, *SHAPE) float64 samples of x_t at (alpha, sigma)."""
        z = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        mean, var = self.marginal(alpha, sigma)
        return mean + var.sqrt() * z


DATA = Gaussian.of([0.3, -0.5, 0.1], [0.5, 0.8, 0.25])
# The unconditional data of the guided case: DATA's class among others, centred and broader (s^2 + 0.25), as
# the unconditional distribution of a class-conditional model is.
UNCOND = Gaussian(torch.zeros_like(DATA.mu), (DATA.s**2 + 0.25).sqrt())


def level(diffusion: GaussianDiffusion, i: int) -> tuple[float, float]:
    """(alpha, sigma) of the respaced process's index i."""
    ac = float(diffusion.alphas_cumprod[i])
    return math.sqrt(ac), math.sqrt(1.0 - ac)


class GaussianModel:
    """`evaluate(x, t) -> Denoised` over Gaussian data, t the respaced index: the exact denoiser of `data`, or
    with `scale` != 1 the guided uncond + scale (cond - uncond) with `uncond` as the unconditional data. The
    output is the process's prediction (eps, or v = alpha eps - sigma x0). Records every t in `calls`."""

    def __init__(
        self, diffusion: GaussianDiffusion, *, data: Gaussian = DATA, uncond: Gaussian = UNCOND, scale: float = 1.0
    ) -> None:
        self.diffusion, self.data, self.uncond, self.scale = diffusion, data, uncond, scale
        self.calls: list[int] = []

    def __call__(self, x: Tensor, t: int) -> Denoised:
        self.calls.append(t)
        assert isinstance(t, int) and 0 <= t < self.diffusion.num_timesteps, (
            f"evaluate called at index {t!r}: the process has indices 0..{self.diffusion.num_timesteps - 1}"
        )
        alpha, sigma = level(self.diffusion, t)
        shift, gain = self.data.denoiser(alpha, sigma)
        if self.scale != 1.0:  # guidance is linear in the two denoisers, so in their shift and gain
            shift_u, gain_u = self.uncond.denoiser(alpha, sigma)
            shift, gain = shift_u + self.scale * (shift - shift_u), gain_u + self.scale * (gain - gain_u)
        x0 = shift.to(x.dtype) + gain.to(x.dtype) * x
        eps = (x - alpha * x0) / sigma  # sigma > 0 at every index: only the data (after index 0) has sigma 0
        output = eps if self.diffusion.prediction == "eps" else alpha * eps - sigma * x0
        return Denoised(x0, eps, output)


class SeededNoise:
    """A `NoiseSource` with one seeded generator per row, as sampling has (so a row's draws do not depend on the
    batch); records the draws asked for in `draws`."""

    def __init__(self, like: Tensor, seeds: Sequence[int]) -> None:
        self.like = like
        self.draws: list[int] = []
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, k: int) -> Tensor:
        self.draws.append(k)
        rows = [torch.randn(self.like.shape[1:], generator=g, dtype=torch.float64) for g in self.generators]
        return torch.stack(rows).to(self.like)  # (B, C, H, W)


# ---------------------------------------------------------------------------------------------- processes


def continuous(steps: int) -> GaussianDiffusion:
    """The order test's process: `steps` levels uniform in log-SNR from EDM sigma SIGMA_MAX down to SIGMA_MIN.

    A continuous schedule, not a respaced 1000-step one: the levels are exact, not rounded to a training grid,
    so every step shrinks exactly as 1 / steps. The range spans the data's scales (0.25 .. 0.8) with room on
    both sides, and is narrow enough (log-SNR steps of 0.56 at 8 steps) that 8 steps already show the asymptotic
    order: over image models' range (EDM sigma 0.002 .. 80) 8 steps are longer than 1 in log-SNR, where an
    exponential integrator's error saturates below C h^order and the fitted slope understates the order."""
    log_sigma = torch.linspace(math.log(SIGMA_MIN), math.log(SIGMA_MAX), steps, dtype=torch.float64)  # (S,)
    ac = torch.sigmoid(-2.0 * log_sigma)  # 1 / (1 + sigma^2), index 0 the least noisy
    betas = 1.0 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    return GaussianDiffusion.from_betas(betas, learn_sigma=False)


def respacer(*, zero_terminal_snr: bool = False) -> Callable[[int, str], GaussianDiffusion]:
    """respace(steps, spacing): fpdm's built-in linear schedule (1000 steps, through the registry: the core
    imports no plugin) respaced as sampling does it; with `zero_terminal_snr` rescaled to zero SNR at its last
    step, and v-prediction (eps cannot recover x0 at zero SNR)."""
    schedule = Registry.load(only=[]).create("schedule", "linear", zero_terminal_snr=zero_terminal_snr)
    base = GaussianDiffusion(schedule, prediction="v" if zero_terminal_snr else "eps", learn_sigma=False)

    def respace(steps: int, spacing: str) -> GaussianDiffusion:
        return base.respace(sorted(schedule.sampling_timesteps(steps, spacing=spacing).tolist()))

    return respace


def run(
    sampler: Sampler, diffusion: GaussianDiffusion, x: Tensor, *, seeds: Sequence[int] = (), scale: float = 1.0
) -> tuple[Tensor, GaussianModel, SeededNoise]:
    """x_0 from x_T = x (row b's noise from seeds[b], default b), with the model and noise source it used."""
    model = GaussianModel(diffusion, scale=scale)
    noise = SeededNoise(x, seeds or range(x.shape[0]))
    out = sampler(model, x.clone(), diffusion, noise=noise)
    assert isinstance(out, Tensor) and out.shape == x.shape and out.dtype == x.dtype, (
        f"the sampler returned {type(out).__name__} {getattr(out, 'shape', '')} {getattr(out, 'dtype', '')} "
        f"for x_T of shape {tuple(x.shape)} and dtype {x.dtype}"
    )
    return out, model, noise


def without_lowering(make: Make) -> Sampler:
    """The sampler at its nominal order throughout: warm-up and final lowering off where it has those options."""
    for options in (
        {"lower_order_warmup": False, "lower_order_final": False},
        {"lower_order_warmup": False},
        {"lower_order_final": False},
    ):
        try:
            return make(**options)
        except (TypeError, UsageError):  # no such option (a class's TypeError, the registry's UsageError)
            continue
    return make()


def fitted_slope(steps: Sequence[int], errors: Sequence[float]) -> float:
    """-d log(error) / d log(steps), least squares over the points."""
    xs, ys = [math.log(s) for s in steps], [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return -sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _rms(a: Tensor, b: Tensor) -> float:
    return (a - b).square().mean().sqrt().item()


# ---------------------------------------------------------------------------------------------- convergence


def convergence(sampler: Sampler) -> dict[str, tuple[list[float], float]]:
    """{case: (error at each of ORDER_STEPS, the slope it must reach)} for the order contract.

    Deterministic samplers: the rms distance to the exact flow's end, and under guidance to the sampler's own
    REFERENCE_STEPS-step run; both must fall at slope order - SLACK. Stochastic samplers: the 2-Wasserstein
    distance of x_0's law (`output_law`) to the exact one, which must fall at weak order 1 - SLACK."""
    if not sampler.deterministic:
        errors = []
        for steps in ORDER_STEPS:
            diffusion = continuous(steps)
            mean, var = output_law(sampler, diffusion)
            alpha, sigma = level(diffusion, 0)
            s2 = DATA.s**2  # (1, C, 1, 1)
            exact = alpha**2 * s2**2 / (alpha**2 * s2 + sigma**2)  # Var D(x) = (alpha s^2 / v)^2 v, v = Var x
            w2 = (mean - DATA.mu).square() + (var.sqrt() - exact.sqrt()).square()  # E D(x) = mu
            errors.append(w2.mean().sqrt().item())
        return {"in distribution (2-Wasserstein)": (errors, 1 - SLACK)}
    reference = continuous(REFERENCE_STEPS)
    x_T = DATA.draw(8, *level(reference, REFERENCE_STEPS - 1), seed=0)  # (B, C, H, W)
    guided_end = run(sampler, reference, x_T, scale=GUIDANCE)[0]
    errors, guided = [], []
    for steps in ORDER_STEPS:
        diffusion = continuous(steps)
        first, last = level(diffusion, steps - 1), level(diffusion, 0)
        exact = DATA.denoise(DATA.flow(x_T, first, last), *last)
        errors.append(_rms(run(sampler, diffusion, x_T)[0], exact))
        guided.append(_rms(run(sampler, diffusion, x_T, scale=GUIDANCE)[0], guided_end))
    return {
        "against the exact flow": (errors, sampler.order - SLACK),
        f"guided (scale {GUIDANCE}) against its own {REFERENCE_STEPS}-step run": (guided, sampler.order - SLACK),
    }


class ProbeNoise:
    """Draw k is one in row k + 2 and zero elsewhere, except in the last row, where it is random: with x_T zero
    in row 0, one in row 1 and random in the last, the rows read off an affine sampler's response."""

    def __init__(self, like: Tensor, seed: int) -> None:
        self.like, self.generator = like, torch.Generator().manual_seed(seed)

    def __call__(self, k: int) -> Tensor:
        z = torch.zeros_like(self.like)  # (N, C, H, W)
        if k + 2 < z.shape[0] - 1:
            z[k + 2] = 1.0
        z[-1] = torch.randn(SHAPE, generator=self.generator, dtype=torch.float64)
        return z


def output_law(sampler: Sampler, diffusion: GaussianDiffusion) -> tuple[Tensor, Tensor]:
    """(mean, variance), each (C, H, W), of x_0 when x_T is drawn from the data's marginal at the noisiest level.

    On the linear Gaussian denoiser an SDE sampler's x_0 = c + A x_T + sum_k B_k z_k, elementwise: probing
    x_T and each draw z_k in turn gives c, A and B_k, hence the law exactly, with no Monte Carlo error. A random
    row checks that the response is affine; a sampler whose response is not (adaptive steps) is skipped."""
    draws = len(run(sampler, diffusion, torch.zeros(1, *SHAPE, dtype=torch.float64))[2].draws)
    x = torch.zeros(draws + 3, *SHAPE, dtype=torch.float64)  # (N, C, H, W)
    x[1] = 1.0
    x[-1] = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sampler(GaussianModel(diffusion), x.clone(), diffusion, noise=ProbeNoise(x, seed=2))
    c, gain, kicks = out[0], out[1] - out[0], out[2:-1] - out[0]  # (C, H, W), (C, H, W), (draws, C, H, W)
    replay = ProbeNoise(x, seed=2)
    z = torch.stack([replay(k)[-1] for k in range(draws)]) if draws else torch.zeros_like(kicks)  # like kicks
    if not torch.allclose(c + gain * x[-1] + (kicks * z).sum(0), out[-1], rtol=1e-8, atol=1e-10):
        skip("the sampler is not affine in x_T and its noise on a linear denoiser; its weak order is not checked")
    mean, var = DATA.marginal(*level(diffusion, diffusion.num_timesteps - 1))  # (1, C, 1, 1) each
    return (c + gain * mean)[0], (gain**2 * var + kicks.square().sum(0))[0]


# ---------------------------------------------------------------------------------------------- contracts


def order_on_gaussian_data(make: Make) -> None:
    """A deterministic sampler converges at its declared `order` on Gaussian data in float64: the fitted slope of
    log terminal error against log steps (8, 16, 32, 64) is >= order - 0.3, against the exact flow, and with
    guidance against its own 4096-step run; a stochastic one converges in distribution at slope >= 0.7.

    Warm-up and final lowering are off. Every sampler ends with x_0 = D(x, sigma_min), the denoiser at the
    smallest level (after it the data has sigma = 0), so the exact end is that same step after the exact flow to
    sigma_min: the flow to sigma = 0 differs from it by O(sigma_min^2) at every step count, which would flatten
    the slope."""
    sampler = without_lowering(make)
    order = sampler.order
    assert isinstance(order, int) and order >= 1, f"order is {order!r}: the nominal order, an int >= 1"
    for case, (errors, required) in convergence(sampler).items():
        slope = fitted_slope(ORDER_STEPS, errors)
        listing = ", ".join(f"{steps}: {e:.3g}" for steps, e in zip(ORDER_STEPS, errors))
        assert slope >= required, f"{case}: error slope {slope:.2f} < {required:.1f} (errors by steps: {listing})"


def _drawn() -> dict[str, Any]:
    """The strategies of the property contracts: steps, spacing, guidance scale, seed."""
    st = strategies()
    return {
        "steps": st.integers(1, 40),
        "spacing": st.sampled_from(SPACINGS),
        "scale": st.one_of(st.just(1.0), st.floats(0.0, 8.0)),
        "seed": st.integers(0, 2**31 - 1),
    }


def _x_T(seed: int, batch: int = 3) -> Tensor:
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))  # (B, C, H, W) float32


def reproducible(make: Make) -> None:
    """A deterministic sampler gives bit-identical samples on reruns at a fixed batch size, whatever the noise
    source; a stochastic one is reproducible from its noise draws and changes with them (from 2 steps on). Rows
    are independent: a row alone gives (up to rounding) its row of the batch."""
    respace = respacer()

    @given(**_drawn())
    def prop(steps: int, spacing: str, scale: float, seed: int) -> None:
        diffusion, x_T, sampler = respace(steps, spacing), _x_T(seed), make()
        first = run(sampler, diffusion, x_T, scale=scale)[0]
        again = run(sampler, diffusion, x_T, scale=scale)[0]  # the same instance: no state kept between calls
        fresh = run(make(), diffusion, x_T, scale=scale, seeds=[3, 4, 5])[0]  # the first run's were 0, 1, 2
        where = f"{steps} steps, spacing {spacing}, guidance {scale}"
        assert torch.equal(first, again), f"{where}: a second call of the same sampler gave other samples"
        if sampler.deterministic:
            assert torch.equal(first, fresh), f"{where}: deterministic, yet other samples on a rerun"
        elif steps >= 2:
            assert not torch.equal(first, fresh), f"{where}: stochastic, yet other noise draws change nothing"
        alone = run(sampler, diffusion, x_T[-1:], scale=scale, seeds=[x_T.shape[0] - 1])[0]  # the last row alone
        torch.testing.assert_close(alone, first[-1:], msg=lambda m: f"{where}: a row alone differs: {m}")

    prop()


def evaluations_and_draws_as_declared(make: Make) -> None:
    """`evaluate` is called once per entry of `levels(diffusion)`, at those indices, in that order, and
    `evaluations(diffusion)` counts them; noise draws k = 0, 1, ... come in order, none when deterministic."""
    respace = respacer()

    @given(**_drawn())
    def prop(steps: int, spacing: str, scale: float, seed: int) -> None:
        diffusion, sampler = respace(steps, spacing), make()
        _, model, noise = run(sampler, diffusion, _x_T(seed), scale=scale)
        _check_calls(sampler, diffusion, model, noise, f"{steps} steps, spacing {spacing}")

    prop()


def _check_calls(
    sampler: Sampler, diffusion: GaussianDiffusion, model: GaussianModel, noise: SeededNoise, where: str
) -> None:
    declared = sampler.levels(diffusion)
    assert model.calls == list(declared), f"{where}: evaluated at {model.calls}, levels() declares {declared}"
    assert sampler.evaluations(diffusion) == len(declared), (
        f"{where}: evaluations() = {sampler.evaluations(diffusion)}, levels() has {len(declared)}"
    )
    assert noise.draws == list(range(len(noise.draws))), f"{where}: noise draws asked in the order {noise.draws}"
    assert not (sampler.deterministic and noise.draws), f"{where}: deterministic, yet drew {len(noise.draws)}"


def finite_under_zero_terminal_snr(make: Make) -> None:
    """Under a zero-terminal-SNR schedule (the noisiest level has alpha = 0) with v-prediction, the samples are
    finite at every step count, spacing and guidance scale, in float32, with the declared evaluations."""
    respace = respacer(zero_terminal_snr=True)

    @given(**_drawn())
    def prop(steps: int, spacing: str, scale: float, seed: int) -> None:
        diffusion, sampler = respace(steps, spacing), make()
        out, model, noise = run(sampler, diffusion, _x_T(seed), scale=scale)
        where = f"zero terminal SNR, {steps} steps, spacing {spacing}, guidance {scale}"
        assert torch.isfinite(out).all(), f"{where}: non-finite samples"
        _check_calls(sampler, diffusion, model, noise, where)

    prop()


CONTRACTS = (
    order_on_gaussian_data,
    reproducible,
    evaluations_and_draws_as_declared,
    finite_under_zero_terminal_snr,
)
