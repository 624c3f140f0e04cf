"""Built-in samplers: DDPM (learned variance when the model has it) and DDIM."""

from __future__ import annotations

from fpdm import hookimpl
from fpdm.sampling import DDIM, DDPM


@hookimpl
def register_samplers(register):  # type: ignore[no-untyped-def]
    register("ddpm", DDPM, description="ancestral sampling with the model's variance")
    register("ddim", DDIM, description="DDIM; eta=0 deterministic")
