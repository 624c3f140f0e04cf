"""Built-in fixed-point solvers: plain (optionally damped) iteration and Anderson acceleration.

Registered through the same `register_solvers` hook a third-party plugin uses.
"""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v
from torch import Tensor

from fpdm import hookimpl
from fpdm.hookspecs import Register
from fpdm.solving.iterative import IterativeSolver


@attrs.frozen
class FixedPointIteration(IterativeSolver):
    """z <- (1 - damping) * f(z) + damping * z. Damping 0 is the official FPDM iteration."""

    damping: float = attrs.field(default=0.0, converter=float, validator=[v.ge(0.0), v.lt(1.0)])

    def init_state(self, z0: Tensor) -> None:
        return None

    def step(self, state: None, z: Tensor, fz: Tensor, *, exportable: bool = False) -> tuple[Tensor, None]:
        if self.damping == 0.0:
            return fz.to(z.dtype), None
        return torch.lerp(fz.to(z.dtype), z, self.damping), None

    def select_state(self, state: None, rows: Tensor) -> None:
        return None


def spd_solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """Solve matrix @ x = rhs for a batch of small symmetric positive-definite systems.

    Gauss-Jordan elimination without pivoting (safe for SPD), unrolled over the static size h and written
    with slicing and arithmetic only, so it exports to ONNX and runs in any dtype. matrix (B, h, h), rhs (B, h).
    """
    h = matrix.shape[-1]
    aug = torch.cat([matrix, rhs.unsqueeze(-1)], dim=-1)  # (B, h, h + 1)
    eye = torch.eye(h, dtype=matrix.dtype, device=matrix.device)
    for j in range(h):
        pivot = aug[:, j : j + 1, :] / aug[:, j : j + 1, j : j + 1]  # (B, 1, h + 1) row j scaled to a unit pivot
        # Subtract the pivot row from every row but j; row j becomes the pivot row itself.
        factor = aug[:, :, j : j + 1] - eye[:, j : j + 1]  # (B, h, 1)
        aug = aug - factor * pivot
    return aug[:, :, h]  # (B, h)


AndersonState = tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor | None]


@attrs.frozen
class Anderson(IterativeSolver):
    """Anderson acceleration (type II) with a window of `m` past iterates.

    Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011.
    Mixing weights alpha minimise ||sum_i alpha_i g_i|| (g_i = f(x_i) - x_i) subject to sum alpha = 1, i.e.
    alpha proportional to (G G^T / s + lam I)^-1 1 with s the mean squared residual of the window, so the
    regularisation follows the problem's scale. The next iterate is sum_i alpha_i (f(x_i) - (1 - beta) g_i).
    The window keeps f(x_i), g_i and their Gram matrix (updated by one row per step), in at least fp32.
    """

    m: int = attrs.field(default=5, validator=[v.instance_of(int), v.ge(1)])
    beta: float = attrs.field(default=1.0, converter=float, validator=[v.gt(0.0), v.le(1.0)])
    lam: float = attrs.field(default=1e-4, converter=float, validator=[v.gt(0.0)])

    def init_state(self, z0: Tensor) -> AndersonState:
        return (), (), None

    def step(
        self, state: AndersonState, z: Tensor, fz: Tensor, *, exportable: bool = False
    ) -> tuple[Tensor, AndersonState]:
        fs, gs, gram = state
        dtype = torch.promote_types(z.dtype, torch.float32)  # at least fp32, whatever f runs in
        f_new = fz.flatten(1).to(dtype)  # (B, n)
        g_new = f_new - z.flatten(1).to(dtype)  # (B, n)
        if gram is not None and len(fs) == self.m:  # window full (gram exists once fs does): forget the oldest
            fs, gs, gram = fs[1:], gs[1:], gram[:, 1:, 1:]
        fs, gs = (*fs, f_new), (*gs, g_new)
        dots = torch.stack([torch.linalg.vecdot(g, g_new) for g in gs], 1)  # (B, h) new Gram row
        if gram is None:
            gram = dots[:, :, None]  # (B, 1, 1)
        else:  # border the old Gram matrix with the new row and column
            gram = torch.cat([torch.cat([gram, dots[:, :-1, None]], 2), dots[:, None, :]], 1)  # (B, h, h)
        h = len(gs)
        eye = torch.eye(h, dtype=dtype, device=z.device)
        scale = torch.diagonal(gram, dim1=1, dim2=2).mean(1).clamp_min(1e-30)  # (B,)
        system = gram / scale[:, None, None] + self.lam * eye  # (B, h, h) SPD, O(1) entries
        ones = torch.ones(gram.shape[:2], dtype=dtype, device=z.device)  # (B, h)
        if exportable:
            w = spd_solve(system, ones)
        else:
            # One fused LAPACK/cuSOLVER call; solve_ex skips the error check, which would sync with the host.
            w = torch.linalg.solve_ex(system, ones.unsqueeze(-1))[0].squeeze(-1)
        alpha = w / w.sum(1, keepdim=True)  # (B, h) sums to 1
        mixed = fs[0] * alpha[:, :1]  # (B, n) a fresh tensor: accumulating into it in place is autograd-safe
        for i in range(1, h):
            mixed.addcmul_(fs[i], alpha[:, i : i + 1])
        if self.beta != 1.0:
            for i in range(h):
                mixed.addcmul_(gs[i], alpha[:, i : i + 1], value=self.beta - 1.0)
        return mixed.view_as(z).to(z.dtype), (fs, gs, gram)

    def select_state(self, state: AndersonState, rows: Tensor) -> AndersonState:
        fs, gs, gram = state
        return tuple(f[rows] for f in fs), tuple(g[rows] for g in gs), None if gram is None else gram[rows]


@hookimpl
def register_solvers(register: Register) -> None:
    register("fixed_point", FixedPointIteration, description="plain fixed-point iteration, optional damping")
    register("anderson", Anderson, description="Anderson acceleration (window m, mixing beta)")
