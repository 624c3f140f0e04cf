"""Built-in denoisers: the FPDM transformer and the DiT baseline, built from the same blocks."""

from __future__ import annotations

from fpdm import hookimpl
from fpdm.hookspecs import Register
from fpdm.models.transformer import FPDM, DiT


@hookimpl
def register_denoisers(register: Register) -> None:
    register("fpdm", FPDM, description="pre blocks, one block iterated to a fixed point, post blocks (Bai et al. 2024)")
    register("dit", DiT, description="diffusion transformer baseline, a plain stack of blocks (Peebles & Xie 2023)")
