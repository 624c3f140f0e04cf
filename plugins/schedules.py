"""Built-in noise schedules: linear (DDPM/DiT default) and cosine (improved DDPM), each with the optional
zero-terminal-SNR rescale. Registered through the same `register_schedules` hook a third-party plugin uses."""

from __future__ import annotations

from fpdm import hookimpl
from fpdm.diffusion import CosineSchedule, LinearSchedule


@hookimpl
def register_schedules(register):  # type: ignore[no-untyped-def]
    register("linear", LinearSchedule, description="linear betas (DDPM/DiT default 1e-4..0.02), optional zero terminal SNR")
    register("cosine", CosineSchedule, description="cosine alpha_bar (Nichol & Dhariwal 2021), optional zero terminal SNR")
