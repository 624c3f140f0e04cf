"""Built-in noise schedules: linear (DDPM/DiT default) and cosine (improved DDPM), each with the optional
zero-terminal-SNR rescale. Registered through the same `register_schedules` hook a third-party plugin uses."""

from __future__ import annotations

import math

import attrs
import torch
from attrs import validators as v
from torch import Tensor

from fpdm import hookimpl
from fpdm.errors import UsageError
from fpdm.hookspecs import Register
from fpdm.interfaces import Schedule


def _open_unit(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise UsageError(f"{attribute.name} must be in (0, 1), got {value}")


def _beta_end_not_below_start(instance: LinearSchedule, attribute: attrs.Attribute, value: float) -> None:
    if value < instance.beta_start:
        raise UsageError(f"beta_end ({value}) must be >= beta_start ({instance.beta_start})")


def _rescale_needs_two_steps(instance: Schedule, attribute: attrs.Attribute, value: bool) -> None:
    if value and instance.num_train_timesteps < 2:
        raise UsageError("zero_terminal_snr needs num_train_timesteps >= 2 (the first and last step must differ)")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose last step has zero SNR, the first step's sqrt(alphas_cumprod) unchanged.

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.
    """
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()  # (T,) sqrt(alphas_cumprod), strictly decreasing
    first, last = root[0].clone(), root[-1].clone()
    # An affine map with positive slope: keeps the order, sends last -> 0 and first -> first.
    root = (root - last) * (first / (first - last))
    ac = root.square()
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])  # (T,) the last is 0, so the last beta is exactly 1
    return 1.0 - alphas


@attrs.frozen
class LinearSchedule(Schedule):
    """betas = linspace(beta_start, beta_end, T) in float64: DDPM's and DiT's default (1e-4 .. 0.02, T = 1000)."""

    num_train_timesteps: int = attrs.field(default=1000, validator=[v.instance_of(int), v.ge(1)])
    beta_start: float = attrs.field(default=1e-4, converter=float, validator=_open_unit)
    beta_end: float = attrs.field(default=0.02, converter=float, validator=[_open_unit, _beta_end_not_below_start])
    zero_terminal_snr: bool = attrs.field(default=False, validator=[v.instance_of(bool), _rescale_needs_two_steps])

    def betas(self) -> Tensor:
        betas = torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=torch.float64)
        return rescale_zero_terminal_snr(betas) if self.zero_terminal_snr else betas


@attrs.frozen
class CosineSchedule(Schedule):
    """Cosine schedule: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2) and
    betas_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta).

    Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", eq. 17. The clip keeps the last
    betas away from 1, where alpha_bar reaches 0.
    """

    num_train_timesteps: int = attrs.field(default=1000, validator=[v.instance_of(int), v.ge(1)])
    s: float = attrs.field(default=0.008, converter=float, validator=[v.ge(0.0), v.lt(1.0)])
    max_beta: float = attrs.field(default=0.999, converter=float, validator=_open_unit)
    zero_terminal_snr: bool = attrs.field(default=False, validator=[v.instance_of(bool), _rescale_needs_two_steps])

    def betas(self) -> Tensor:
        steps = torch.arange(self.num_train_timesteps + 1, dtype=torch.float64) / self.num_train_timesteps
        alpha_bar = torch.cos((steps + self.s) / (1.0 + self.s) * (math.pi / 2)).square()  # (T + 1,)
        betas = (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=self.max_beta)  # (T,)
        return rescale_zero_terminal_snr(betas) if self.zero_terminal_snr else betas


@hookimpl
def register_schedules(register: Register) -> None:
    register(
        "linear", LinearSchedule, description="linear betas (DDPM/DiT default 1e-4..0.02), optional zero terminal SNR"
    )
    register(
        "cosine", CosineSchedule, description="cosine alpha_bar (Nichol & Dhariwal 2021), optional zero terminal SNR"
    )
