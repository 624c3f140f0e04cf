"""Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
sec. 3.4), for eps- and v-prediction.

The paper weights the x0 error: w_t ||x0 - x0_hat||^2 with w_t = min(SNR_t, gamma), SNR_t = ac_t / (1 - ac_t).
fpdm regresses eps or v instead, so the weight carries the change of variables:
- eps: x0 - x0_hat = -sqrt((1 - ac) / ac) (eps - eps_hat), so ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR and
  the eps weight is min(SNR, gamma) / SNR = min(1, gamma / SNR);
- v: x0_hat = sqrt(ac) x_t - sqrt(1 - ac) v_hat, so x0 - x0_hat = -sqrt(1 - ac) (v - v_hat), and 1 - ac =
  1 / (SNR + 1): the v weight is min(SNR, gamma) / (SNR + 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fpdm.errors import UsageError


def min_snr_weights(alphas_cumprod: Tensor, *, gamma: float, prediction: str) -> Tensor:
    """The mse weight of every timestep, (T,) float64, for alphas_cumprod (T,) and `gamma` > 0."""
    if gamma <= 0:
        raise UsageError(f"min-SNR gamma must be > 0, got {gamma}")
    ac = alphas_cumprod.double()
    snr = ac / (1.0 - ac)  # (T,); 0 at a zero-terminal-SNR last step
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)  # gamma / 0 = inf -> 1: eps refuses zero SNR anyway
    if prediction == "v":
        return snr.clamp(max=gamma) / (snr + 1.0)
    raise UsageError(f"min-SNR weighting knows eps and v prediction, got {prediction!r}")


def weight_losses(losses: dict[str, Tensor], weights: Tensor) -> dict[str, Tensor]:
    """Per-sample losses with "loss" = weights * mse (+ vb), weights (B,). The vb term stays unweighted: it trains
    only the learned variance (the prediction reaches it detached), while the weighting balances the denoising
    error across timesteps. "mse" and "vb" are returned unchanged, for the log."""
    loss = weights.to(losses["mse"].dtype) * losses["mse"]  # (B,)
    if "vb" in losses:
        loss = loss + losses["vb"]
    return {**losses, "loss": loss}


def weight_table(alphas_cumprod: Tensor, *, gamma: float, prediction: str, device: torch.device) -> Tensor | None:
    """The per-timestep weights on `device` as float32 (T,), or None when gamma is 0 (no weighting)."""
    if gamma == 0:
        return None
    return min_snr_weights(alphas_cumprod, gamma=gamma, prediction=prediction).float().to(device)
