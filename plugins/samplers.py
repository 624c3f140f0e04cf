"""Built-in samplers: DDPM (learned variance when the model has it) and DDIM."""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v
from torch import Tensor

from fpdm import hookimpl
from fpdm.diffusion.gaussian import GaussianDiffusion


@attrs.frozen
class DDPM:
    """Ancestral sampling with the model's (learned or fixed) variance (Ho et al. 2020; Nichol & Dhariwal 2021)."""

    def __call__(self, diffusion: GaussianDiffusion, model_output: Tensor, x: Tensor, i: int, *,
                 noise: Tensor, clip_x0: bool) -> Tensor:
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = diffusion.p_mean_variance(model_output, x, t, clip_x0=clip_x0)
        if i == 0:  # no noise at the last step
            return out["mean"]
        return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise


@attrs.frozen
class DDIM:
    """Song et al. 2021, eq. 12; eta = 0 is deterministic, eta = 1 matches DDPM's posterior variance."""

    eta: float = attrs.field(default=0.0, converter=float, validator=[v.ge(0.0), v.le(1.0)])

    def __call__(self, diffusion: GaussianDiffusion, model_output: Tensor, x: Tensor, i: int, *,
                 noise: Tensor, clip_x0: bool) -> Tensor:
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        pred, _ = diffusion.split_output(model_output, x)
        x0 = diffusion.predict_x0(pred, x, t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        eps = (diffusion.extract("sqrt_recip_alphas_cumprod", t, x) * x - x0) / diffusion.extract(
            "sqrt_recipm1_alphas_cumprod", t, x)  # the noise consistent with the (clipped) x0
        ac = diffusion.extract("alphas_cumprod", t, x)
        ac_prev = diffusion.extract("alphas_cumprod_prev", t, x)
        sigma = self.eta * torch.sqrt((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev))
        mean = x0 * torch.sqrt(ac_prev) + torch.sqrt((1 - ac_prev - sigma**2).clamp_min(0)) * eps
        return mean if i == 0 else mean + sigma * noise



@hookimpl
def register_samplers(register):  # type: ignore[no-untyped-def]
    register("ddpm", DDPM, description="ancestral sampling with the model's variance")
    register("ddim", DDIM, description="DDIM; eta=0 deterministic")
