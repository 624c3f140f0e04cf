"""Noise schedules and the Gaussian diffusion process: forward noising, prediction conversions, the
true posterior, the model's reverse step and the training losses (eps- or v-prediction, learned variance).

Behaviour follows DiT's `gaussian_diffusion.py` (itself from improved DDPM), which the official FPDM code
uses unchanged apart from v-prediction and the zero-terminal-SNR option. Tables are float64 on the CPU,
moved once per device and cast to the data's dtype on use. The process holds no parameters and no state.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fpdm.errors import UsageError
from fpdm.interfaces import Schedule
from fpdm.spacing import log_sigmas

PREDICTIONS = ("eps", "v")
ModelOutputFn = Callable[[Tensor, Tensor], Tensor]

# --------------------------------------------------------------------------------------------------------------
# Gaussian helpers


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (closed form for two Gaussians)."""
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2).square() * torch.exp(-logvar2) - 1.0
    )


def discretized_gaussian_log_likelihood(x: Tensor, *, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) elementwise for data x in [-1, 1] quantised to 256 bins, under N(mean, exp(log_scale)^2).

    Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 13: each bin integrates the Gaussian over
    [x - 1/255, x + 1/255]; the outermost bins extend to -inf and +inf. Uses the exact normal CDF (DiT uses a
    tanh approximation of it); the tail bins use log_ndtr so far-off means stay finite.
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X <= upper), the bin at -1
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > lower), the bin at +1
    mass = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    log_mid = torch.log(mass.clamp(min=1e-12))  # the clamp matches DiT's floor for an empty interior bin
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))


# --------------------------------------------------------------------------------------------------------------
# The process


class GaussianDiffusion:
    """The DDPM process over `num_timesteps` steps with eps- or v-prediction and optionally learned variance.

    Index t (int64, (B,)) counts this process's steps; `timestep_map[t]` is the training timestep the model is
    called with (the identity, or the chosen subset after `respace`). The model's output has C channels, or 2C
    with `learn_sigma`: the prediction, then v in [-1, 1] interpolating the log variance between the posterior's
    (clipped) and log beta_t (Nichol & Dhariwal 2021, eq. 15). Without `learn_sigma` the variance is DiT's
    "fixed small": the posterior variance, its log clipped at t = 0 to the value at t = 1.
    """

    def __init__(self, schedule: Schedule, *, prediction: str = "eps", learn_sigma: bool = True) -> None:
        self._setup(schedule.betas(), prediction=prediction, learn_sigma=learn_sigma, timestep_map=None)

    @classmethod
    def from_betas(
        cls, betas: Tensor, *, prediction: str = "eps", learn_sigma: bool = True, timestep_map: Tensor | None = None
    ) -> GaussianDiffusion:
        """A process over explicit betas (float64 (T,), each in (0, 1]); `timestep_map` defaults to the identity."""
        process = cls.__new__(cls)
        process._setup(betas, prediction=prediction, learn_sigma=learn_sigma, timestep_map=timestep_map)
        return process

    def _setup(self, betas: Tensor, *, prediction: str, learn_sigma: bool, timestep_map: Tensor | None) -> None:
        if prediction not in PREDICTIONS:
            raise UsageError(f"unknown prediction {prediction!r}; known: {', '.join(PREDICTIONS)}")
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.dim() != 1 or betas.numel() == 0:
            raise UsageError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise UsageError("every beta must be in (0, 1]")
        self.prediction, self.learn_sigma = prediction, bool(learn_sigma)
        T = betas.numel()
        if timestep_map is None:
            self.timestep_map = torch.arange(T)
        else:  # int64, or float64 after a fractional (karras) respacing
            mapped = torch.as_tensor(timestep_map).cpu()
            self.timestep_map = mapped.double() if mapped.is_floating_point() else mapped.long()
        if self.timestep_map.shape != (T,):
            raise UsageError(f"timestep_map must have shape ({T},), got {tuple(self.timestep_map.shape)}")

        # Ho et al. 2020 (eqs. 4, 6, 7) and Nichol & Dhariwal 2021 (eq. 15), all float64 (T,).
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        if prediction == "eps" and self.alphas_cumprod[-1] == 0:
            # x0 = (x_t - sqrt(1 - ac) eps) / sqrt(ac) is undefined at zero SNR: the losses would be NaN there.
            raise UsageError("a zero-terminal-SNR schedule needs prediction='v' (eps cannot recover x0 at zero SNR)")
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = self.alphas_cumprod.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.log_betas = betas.log()
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the next value (a 1-step process, which
        # has none, uses beta_0, the largest variance it could have).
        floor = self.posterior_variance[1:2] if T > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.cat([floor, self.posterior_variance[1:]]).log()
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        # The noise levels as Python numbers, for samplers and plans that turn a level into a coefficient: read
        # from a tensor, a traced whole loop would record a data-dependent read instead of a constant.
        self.ac_values: list[float] = self.alphas_cumprod.tolist()
        self.timestep_values: list[float] = [float(t) for t in self.timestep_map.tolist()]
        self._on_device: dict[torch.device, dict[str, Tensor]] = {}

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}, prediction={self.prediction!r}, "
            f"learn_sigma={self.learn_sigma})"
        )

    # ---------------------------------------------------------------------------------------------- tables
    def _table(self, name: str, device: torch.device) -> Tensor:
        # Each table crosses to a device once: a copy per call would be a host-to-device transfer per step.
        tables = self._on_device.setdefault(device, {})
        if name not in tables:
            tables[name] = getattr(self, name).to(device)
        return tables[name]

    def extract(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """Table `name` (T,) at indices t (B,), shaped (B, 1, ..., 1) to broadcast against x, in x's dtype and
        device."""
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise UsageError(f"t must have shape ({x.shape[0]},) to match the batch, got {tuple(t.shape)}")
        values = self._table(name, x.device)[t.to(x.device)].to(x.dtype)  # (B,)
        return values.view(-1, *([1] * (x.dim() - 1)))  # (B, 1, ..., 1)

    def map_timesteps(self, t: Tensor) -> Tensor:
        """The training timesteps the model is called with at this process's indices t, on t's device: int64, or
        float64 when the process was respaced to fractional timesteps."""
        return self._table("timestep_map", t.device)[t]

    # ---------------------------------------------------------------------------------------------- forward
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(ac_t) x0 + sqrt(1 - ac_t) noise (Ho et al. 2020, eq. 4)."""
        return (
            self.extract("sqrt_alphas_cumprod", t, x0) * x0
            + self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target: noise for eps; v = sqrt(ac) noise - sqrt(1 - ac) x0 (Salimans & Ho 2022, sec. 4)."""
        if self.prediction == "eps":
            return noise
        return (
            self.extract("sqrt_alphas_cumprod", t, x0) * noise
            - self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )

    def predict_x0(self, model_pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x0 from the model's prediction (C channels): inverts q_sample for eps;
        x0 = sqrt(ac) x_t - sqrt(1 - ac) v for v."""
        if self.prediction == "eps":
            return (
                self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * model_pred
            )
        return (
            self.extract("sqrt_alphas_cumprod", t, x_t) * x_t
            - self.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * model_pred
        )

    def predict_eps(self, model_pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The noise from the model's prediction: itself for eps, eps = sqrt(1 - ac) x_t + sqrt(ac) v for v."""
        if self.prediction == "eps":
            return model_pred
        return (
            self.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t
            + self.extract("sqrt_alphas_cumprod", t, x_t) * model_pred
        )

    # ---------------------------------------------------------------------------------------------- reverse
    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0) (Ho et al. 2020, eqs. 6-7)."""
        mean = self.extract("posterior_mean_coef1", t, x_t) * x0 + self.extract("posterior_mean_coef2", t, x_t) * x_t
        variance = self.extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def split_output(self, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(prediction, variance values or None): checks the channel count (C, or 2C with learn_sigma)."""
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape != (x_t.shape[0], expected, *x_t.shape[2:]):
            raise UsageError(
                f"model output has shape {tuple(model_output.shape)}, "
                f"expected {(x_t.shape[0], expected, *x_t.shape[2:])}: "
                f"{expected} channels for {channels}-channel data with learn_sigma={self.learn_sigma}"
            )
        if not self.learn_sigma:
            return model_output, None
        pred, var_values = model_output.split(channels, dim=1)
        return pred, var_values

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, *, clip_x0: bool = False
    ) -> dict[str, Tensor]:
        """The model's Gaussian p(x_{t-1} | x_t): {"mean", "variance", "log_variance", "pred_x0"}, each x_t's shape.

        The mean is the posterior mean at the predicted x0 (clamped to [-1, 1] with `clip_x0`), as DiT computes it.
        Learned variance: log var = frac log beta_t + (1 - frac) log posterior var, frac = (v + 1) / 2
        (Nichol & Dhariwal 2021, eq. 15).
        """
        pred, var_values = self.split_output(model_output, x_t)
        if var_values is None:
            variance = self.extract("posterior_variance", t, x_t).expand_as(x_t)
            log_variance = self.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        else:
            min_log = self.extract("posterior_log_variance_clipped", t, x_t)
            max_log = self.extract("log_betas", t, x_t)
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = log_variance.exp()
        pred_x0 = self.predict_x0(pred, x_t, t)
        if clip_x0:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0}

    # ---------------------------------------------------------------------------------------------- training
    def vb_terms_bpd(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-sample variational-bound term in bits per dim, (B,): KL(q(x_{t-1}|x_t, x0) || p(x_{t-1}|x_t)) for
        t > 0, the discretized Gaussian decoder NLL of x0 at t = 0 (Ho et al. 2020, eq. 5; DiT's _vb_terms_bpd)."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean=out["mean"], log_scale=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def training_losses(
        self, model_output_fn: ModelOutputFn, x0: Tensor, t: Tensor, *, noise: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Per-sample losses, each (B,): "mse" = mean (target - prediction)^2, "vb" with learn_sigma, "loss".

        `model_output_fn(x_t, timestep_map[t])` returns the network output. With learn_sigma the vb term sees the
        prediction detached, so it trains only the variance and the mse alone trains the mean (Nichol & Dhariwal
        2021, sec. 3.1); "loss" = mse + vb, unscaled, as DiT's MSE loss type. Without it "loss" = mse.
        """
        if x0.dim() < 2:
            raise UsageError(f"x0 must be (B, C, ...), got shape {tuple(x0.shape)}")
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        model_output = model_output_fn(x_t, self.map_timesteps(t))
        pred, var_values = self.split_output(model_output, x_t)
        terms = {"mse": mean_flat((self.target(x0, noise, t) - pred).square())}
        if var_values is not None:
            frozen = torch.cat([pred.detach(), var_values], dim=1)  # (B, 2C, ...) gradient reaches v only
            terms["vb"] = self.vb_terms_bpd(frozen, x0, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    # ---------------------------------------------------------------------------------------------- respacing
    def respace(self, timesteps: Sequence[float] | Tensor) -> GaussianDiffusion:
        """A process over a strictly increasing subset of this one's steps, for sampling with fewer of them.

        betas_i = 1 - ac[t_i] / ac[t_{i-1}] (the first: 1 - ac[t_0]), so the kept steps keep their alphas_cumprod
        (DiT's respace.py). Same prediction and learn_sigma; `timestep_map` maps to the model's timesteps.
        Fractional timesteps (karras spacing) are allowed: their alphas_cumprod come from log sigma interpolated
        linearly between the neighbouring steps, and `timestep_map` becomes float64 (the model's sinusoidal
        embedding takes real timesteps).
        """
        steps = self._check_subset(timesteps)
        ac = self.alphas_cumprod_at(steps)  # (S,)
        betas = 1.0 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        mapped = self.timestep_map[steps] if steps.dtype == torch.int64 else self._map_fractional(steps)
        return GaussianDiffusion.from_betas(
            betas, prediction=self.prediction, learn_sigma=self.learn_sigma, timestep_map=mapped
        )

    def alphas_cumprod_at(self, t: Tensor) -> Tensor:
        """float64 alphas_cumprod at steps t: exact at integer steps (int64 t, or integral floats), log sigma
        interpolated linearly in t between neighbours otherwise."""
        if t.dtype == torch.int64:
            return self.alphas_cumprod[t]
        logs = log_sigmas(self.alphas_cumprod)  # (T,), +inf at a zero-SNR last step
        lo = t.floor().long().clamp(0, self.num_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        w = t - lo.double()
        between = logs[lo] + w * (logs[hi] - logs[lo])
        log_sigma = torch.where(w == 0, logs[lo], between)  # an exact step never meets the other neighbour's inf
        return torch.sigmoid(-2.0 * log_sigma)  # 1 / (1 + sigma^2)

    def _map_fractional(self, t: Tensor) -> Tensor:
        """The model timesteps at fractional steps t: the map interpolated linearly (the identity stays one)."""
        grid = self.timestep_map.double()
        lo = t.floor().long().clamp(0, self.num_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        return grid[lo] + (t - lo.double()) * (grid[hi] - grid[lo])

    def _check_subset(self, timesteps: Sequence[float] | Tensor) -> Tensor:
        """int64 (S,) when every timestep is an integer, else float64 (S,); strictly increasing, in range."""
        values = timesteps.tolist() if isinstance(timesteps, Tensor) else list(timesteps)
        if not values:
            raise UsageError("timesteps must not be empty")
        try:
            steps = [operator.index(step) if not isinstance(step, float) else step for step in values]
        except TypeError:
            raise UsageError(f"timesteps must be numbers, got {values!r}") from None
        if not all(isinstance(step, int) or math.isfinite(step) for step in steps):
            raise UsageError(f"timesteps must be finite, got {values!r}")
        if not all(0 <= step <= self.num_timesteps - 1 for step in steps):
            raise UsageError(f"timesteps must be in 0..{self.num_timesteps - 1}, got {min(steps)}..{max(steps)}")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise UsageError("timesteps must be strictly increasing (sorted, no duplicates)")
        if all(isinstance(step, int) or float(step).is_integer() for step in steps):
            return torch.tensor([int(step) for step in steps], dtype=torch.int64)
        return torch.tensor(steps, dtype=torch.float64)
