"""A third-party fpdm solver plugin: Barzilai-Borwein secant steps for z = f(z).

Barzilai & Borwein, "Two-point step size gradient methods", IMA J. Numer. Anal. 1988. The residual
g(z) = f(z) - z is driven to zero with z <- z - a * g, where the scalar a = <s, y> / <y, y> (s and y the last
changes of z and g) is a per-sample secant estimate of the inverse Jacobian of g. It needs two vectors of
memory per sample instead of Anderson's 2m, and every op exports to ONNX.
"""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v
from torch import Tensor

import fpdm


@attrs.frozen
class BarzilaiBorwein(fpdm.IterativeSolver):
    """Secant solver with a per-sample scalar step; the first step is a plain fixed-point step."""

    max_step: float = attrs.field(default=100.0, converter=float, validator=v.gt(0.0))

    def init_state(self, z0: Tensor) -> tuple[Tensor, Tensor] | None:
        return None

    def step(self, state, z: Tensor, fz: Tensor, *, exportable: bool = False):  # type: ignore[no-untyped-def]
        dtype = torch.promote_types(z.dtype, torch.float32)  # at least fp32 memory, whatever f runs in
        x, g = z.flatten(1).to(dtype), (fz.to(dtype) - z.to(dtype)).flatten(1)  # (B, n)
        if state is None:
            return fz.to(z.dtype), (x, g)
        s, y = x - state[0], g - state[1]  # (B, n)
        yy = (y * y).sum(1, keepdim=True)  # (B, 1)
        a = (s * y).sum(1, keepdim=True) / yy.clamp_min(1e-30)
        # A stalled or flat step (y ~ 0) falls back to the plain step a = -1; the step size is bounded.
        a = torch.where(yy > 1e-30, a, torch.full_like(a, -1.0)).clamp(-self.max_step, self.max_step)
        return (x - a * g).view_as(z).to(z.dtype), (x, g)

    def select_state(self, state, rows: Tensor):  # type: ignore[no-untyped-def]
        return None if state is None else (state[0][rows], state[1][rows])


@fpdm.hookimpl
def register_solvers(register):  # type: ignore[no-untyped-def]
    register("barzilai_borwein", BarzilaiBorwein, description="secant steps with a per-sample scalar (example plugin)")
