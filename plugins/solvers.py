"""Built-in fixed-point solvers: plain (optionally damped) iteration and Anderson acceleration.

Registered through the same `register_solvers` hook a third-party plugin uses.
"""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v
from torch import Tensor

from fpdm import hookimpl
from fpdm.solving import IterativeSolver


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


@attrs.frozen
class Anderson(IterativeSolver):
    """Anderson acceleration (type II) with a window of `m` past iterates.

    Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011.
    Mixing weights alpha minimise ||sum_i alpha_i (f(x_i) - x_i)|| subject to sum alpha = 1; that is
    alpha proportional to (G G^T + lam * s * I)^-1 1 with s the mean squared residual of the window, so the
    regularisation follows the problem's scale. History and the small solve stay in at least fp32 whatever dtype f uses.
    """

    m: int = attrs.field(default=5, validator=[v.instance_of(int), v.ge(1)])
    beta: float = attrs.field(default=1.0, converter=float, validator=[v.gt(0.0), v.le(1.0)])
    lam: float = attrs.field(default=1e-4, converter=float, validator=[v.gt(0.0)])

    def init_state(self, z0: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        return (), ()

    def step(
        self, state: tuple[tuple[Tensor, ...], tuple[Tensor, ...]], z: Tensor, fz: Tensor, *, exportable: bool = False
    ) -> tuple[Tensor, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]:
        xs, fs = state
        dtype = torch.promote_types(z.dtype, torch.float32)  # at least fp32, whatever f runs in
        xs = (*xs, z.flatten(1).to(dtype))[-self.m :]  # window of iterates, each (B, n)
        fs = (*fs, fz.flatten(1).to(dtype))[-self.m :]  # their images
        x_hist, f_hist = torch.stack(xs, 1), torch.stack(fs, 1)  # (B, h, n)
        g = f_hist - x_hist  # (B, h, n) residuals
        gram = g @ g.transpose(1, 2)  # (B, h, h)
        h = gram.shape[-1]
        eye = torch.eye(h, dtype=gram.dtype, device=gram.device)
        scale = torch.diagonal(gram, dim1=1, dim2=2).mean(1).clamp_min(1e-30)  # (B,)
        system = gram / scale[:, None, None] + self.lam * eye  # (B, h, h) SPD, O(1) entries
        ones = torch.ones(gram.shape[:2], dtype=gram.dtype, device=gram.device)  # (B, h)
        if exportable:
            w = spd_solve(system, ones)
        else:
            # One fused LAPACK/cuSOLVER call; solve_ex skips the error check, which would sync with the host.
            w = torch.linalg.solve_ex(system, ones.unsqueeze(-1))[0].squeeze(-1)
        alpha = w / w.sum(1, keepdim=True)  # (B, h) sums to 1
        mixed = (alpha.unsqueeze(1) @ f_hist).squeeze(1)  # (B, n)
        if self.beta != 1.0:
            mixed = self.beta * mixed + (1.0 - self.beta) * (alpha.unsqueeze(1) @ x_hist).squeeze(1)
        return mixed.view_as(z).to(z.dtype), (xs, fs)

    def select_state(
        self, state: tuple[tuple[Tensor, ...], tuple[Tensor, ...]], rows: Tensor
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        xs, fs = state
        return tuple(x[rows] for x in xs), tuple(f[rows] for f in fs)


@hookimpl
def register_solvers(register):  # type: ignore[no-untyped-def]
    register("fixed_point", FixedPointIteration, description="plain fixed-point iteration, optional damping")
    register("anderson", Anderson, description="Anderson acceleration (window m, mixing beta)")
