"""Built-in samplers over the model evaluation: DDPM (learned variance when the model has it) and DDIM here, the
EDM and multistep samplers in `fpdm.plugins.multistep`; all registered below, through the same hook a third
party uses."""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v
from torch import Tensor

from fpdm import hookimpl
from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.hookspecs import Register
from fpdm.interfaces import Evaluate, NoiseSource, Sampler
from fpdm.plugins.multistep import DPMSolverPP, DPMSolverPP2MSDE, Euler, EulerAncestral, Heun, UniPC


def _model_log_variance(diffusion: GaussianDiffusion, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """The model's log variance at t, as `GaussianDiffusion.p_mean_variance` computes it: learned, between the
    clipped posterior's and log beta_t (Nichol & Dhariwal 2021, eq. 15), or DiT's fixed small."""
    _, var_values = diffusion.split_output(output, x)
    if var_values is None:
        return diffusion.extract("posterior_log_variance_clipped", t, x).expand_as(x)
    min_log = diffusion.extract("posterior_log_variance_clipped", t, x)
    max_log = diffusion.extract("log_betas", t, x)
    frac = (var_values + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


@attrs.frozen
class DDPM(Sampler):
    """Ancestral sampling with the model's (learned or fixed) variance (Ho et al. 2020; Nichol & Dhariwal 2021):
    x_{t-1} = posterior mean at the predicted x0 + exp(log var / 2) * noise, no noise at the last step."""

    @property
    def deterministic(self) -> bool:
        return False

    def __call__(self, evaluate: Evaluate, x: Tensor, diffusion: GaussianDiffusion, *, noise: NoiseSource) -> Tensor:
        for step, i in enumerate(reversed(range(diffusion.num_timesteps))):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)  # (B,)
            d = evaluate(x, i)
            mean, _, _ = diffusion.q_posterior(d.x0, x, t)
            if i == 0:
                return mean
            x = mean + torch.exp(0.5 * _model_log_variance(diffusion, d.output, x, t)) * noise(step)
        return x


@attrs.frozen
class DDIM(Sampler):
    """Song et al. 2021, eq. 12; eta = 0 is deterministic, eta = 1 matches DDPM's posterior variance."""

    eta: float = attrs.field(default=0.0, converter=float, validator=[v.ge(0.0), v.le(1.0)])

    @property
    def deterministic(self) -> bool:
        return self.eta == 0

    def __call__(self, evaluate: Evaluate, x: Tensor, diffusion: GaussianDiffusion, *, noise: NoiseSource) -> Tensor:
        for step, i in enumerate(reversed(range(diffusion.num_timesteps))):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)  # (B,)
            x0 = evaluate(x, i).x0
            if diffusion.ac_values[i] == 0:  # zero SNR: x_T is all noise (eq. 12's form is inf / inf)
                eps = x
            else:  # the noise consistent with the (clipped) x0, in eq. 12's own form
                eps = (diffusion.extract("sqrt_recip_alphas_cumprod", t, x) * x - x0) / diffusion.extract(
                    "sqrt_recipm1_alphas_cumprod", t, x
                )
            ac = diffusion.extract("alphas_cumprod", t, x)
            ac_prev = diffusion.extract("alphas_cumprod_prev", t, x)
            sigma = self.eta * torch.sqrt((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev))
            mean = x0 * torch.sqrt(ac_prev) + torch.sqrt((1 - ac_prev - sigma**2).clamp_min(0)) * eps
            x = mean if i == 0 or self.deterministic else mean + sigma * noise(step)
        return x


@hookimpl
def register_samplers(register: Register) -> None:
    register("ddpm", DDPM, description="ancestral sampling with the model's variance")
    register("ddim", DDIM, description="DDIM (Song et al. 2021); eta=0 deterministic, order 1")
    register("euler", Euler, description="EDM Euler steps (Karras et al. 2022), order 1")
    register("euler_ancestral", EulerAncestral, description="Euler with ancestral noise (eta), order 1")
    register("heun", Heun, description="EDM Heun (Karras et al. 2022), 2 evaluations per step, order 2")
    register("dpmpp_2m", dpmpp_2m, description="DPM-Solver++(2M) multistep (Lu et al. 2022), order 2")
    register("dpmpp_3m", dpmpp_3m, description="DPM-Solver++(3M) multistep, order 3")
    register("dpmpp_2m_sde", DPMSolverPP2MSDE, description="SDE-DPM-Solver++(2M) with seeded noise (eta)")
    register("unipc", UniPC, description="UniPC bh2 (Zhao et al. 2023), solver_order 2 -> order 3")


def dpmpp_2m(*, lower_order_warmup: bool = True, lower_order_final: bool = True) -> DPMSolverPP:
    """DPM-Solver++(2M): second-order multistep, data prediction."""
    return DPMSolverPP(2, lower_order_warmup=lower_order_warmup, lower_order_final=lower_order_final)


def dpmpp_3m(*, lower_order_warmup: bool = True, lower_order_final: bool = True) -> DPMSolverPP:
    """DPM-Solver++(3M): third-order multistep, data prediction."""
    return DPMSolverPP(3, lower_order_warmup=lower_order_warmup, lower_order_final=lower_order_final)
