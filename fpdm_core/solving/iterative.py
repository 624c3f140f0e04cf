"""The per-sample solve loop shared by iterative solvers.

A solver plugin that is "an update rule" (plain iteration, Anderson, Broyden, ...) subclasses
`IterativeSolver` and writes three small methods; the loop here gives it per-sample stopping, freezing of
converged and non-finite samples, batch compaction for maps that can be restricted to rows, sync-free
stretches, residual traces and an unrolled form for export, all with one behaviour.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch
from torch import Tensor

from fpdm.errors import UsageError
from fpdm.interfaces import FixedPointMap, RestrictableMap, Solver, SolverResult, SolverStats

RESIDUAL_EPS = 1e-8


def relative_residual(z: Tensor, fz: Tensor) -> Tensor:
    """||f(z) - z|| / (||f(z)|| + eps) per sample, in fp32: scale-free, so one tol fits every model size.

    NaN wherever the state is not finite or so large that its norm overflows: such a sample has diverged
    and must not read as converged through x / inf = 0. Comparisons with NaN are false, which is what the
    solve loop relies on to stop and never accept it.
    """
    dims = tuple(range(1, z.dim()))
    dtype = torch.promote_types(fz.dtype, torch.float32)  # bf16/fp16 maps are measured in fp32, fp64 in fp64
    diff = torch.linalg.vector_norm(fz.to(dtype) - z.to(dtype), dim=dims)  # (B,)
    size = torch.linalg.vector_norm(fz, dim=dims, dtype=dtype)  # (B,)
    res = (diff + 0.0 * size) / (size + RESIDUAL_EPS)  # 0 * inf = NaN marks an overflowed norm
    return torch.nan_to_num(res, nan=math.nan, posinf=math.nan).float()


def check_solve_args(max_iter: Any, tol: Any, check_every: Any, batch: int | None = None) -> None:
    """Reject bad solve arguments with one line that says what is allowed."""
    if isinstance(max_iter, Tensor):
        if max_iter.dtype.is_floating_point or max_iter.dtype == torch.bool or max_iter.shape != (batch,):
            raise UsageError(
                f"per-sample max_iter must be an integer tensor of shape ({batch},), "
                f"got {max_iter.dtype} {tuple(max_iter.shape)}"
            )
        if bool((max_iter < 0).any()):
            raise UsageError("per-sample max_iter must be >= 0")
    elif isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise UsageError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol >= 0 and math.isfinite(tol)):
        raise UsageError(f"tol must be a finite number >= 0 (0 = run exactly max_iter), got {tol!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise UsageError(f"check_every must be an integer >= 1, got {check_every!r}")


def _rows_mask(mask: Tensor, like: Tensor) -> Tensor:
    """(A,) -> (A, 1, ..., 1) so a per-sample mask broadcasts against a batch of states."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


class IterativeSolver(Solver):
    """A solver defined by its update rule z_{k+1} = step(state, z_k, f(z_k)).

    Subclasses implement `init_state`, `step` and `select_state`. `step` must be written with ops that
    export to ONNX when `exportable=True` (it is then traced inside `unrolled`).
    """

    @abc.abstractmethod
    def init_state(self, z0: Tensor) -> Any:
        """Solver memory before the first evaluation (None when the rule has none)."""

    @abc.abstractmethod
    def step(self, state: Any, z: Tensor, fz: Tensor, *, exportable: bool = False) -> tuple[Tensor, Any]:
        """The next iterate (z's shape and dtype) and the updated memory. Rows must not mix."""

    @abc.abstractmethod
    def select_state(self, state: Any, rows: Tensor) -> Any:
        """The memory of the given rows (int64 indices into the current batch)."""

    def unrolled(self, f: FixedPointMap, z0: Tensor, *, iters: int) -> Tensor:
        check_solve_args(iters, 0.0, 1)
        z, fz, state = z0, z0, self.init_state(z0)
        for k in range(iters):
            fz = f(z)
            if k + 1 < iters:  # the last evaluation's image is the answer; no update after it
                z, state = self.step(state, z, fz, exportable=True)
        return fz.to(z0.dtype)

    def solve(
        self,
        f: FixedPointMap,
        z0: Tensor,
        *,
        max_iter: int | Tensor,
        tol: float,
        check_every: int = 1,
        trace: bool = False,
    ) -> SolverResult:
        batch, device = z0.shape[0], z0.device
        check_solve_args(max_iter, tol, check_every, batch)
        exact = tol == 0
        limits_a = None  # per-sample caps (adaptive budgets): rows stop at their own limit
        if isinstance(max_iter, Tensor):
            limits_a = max_iter.to(device=device, dtype=torch.int64)
            max_iter = int(limits_a.max()) if batch else 0
        # Full-batch results, filled when rows leave the loop (compaction) and at the end.
        out = torch.empty_like(z0)
        best = torch.full((batch,), math.inf if max_iter else math.nan, device=device)
        iters = torch.zeros(batch, dtype=torch.int64, device=device)
        trc = torch.full((batch, max_iter), math.nan, device=device) if trace else None

        # The loop works on the active rows only: `rows` maps them into the batch. A sample that never
        # sees a finite image of f keeps z0 as its estimate.
        rows = torch.arange(batch, device=device)
        out_a, best_a, iters_a, trc_a = z0.clone(), best.clone(), iters.clone(), None if trc is None else trc.clone()
        live = torch.ones(batch, dtype=torch.bool, device=device) if limits_a is None else limits_a > 0
        z, fa, state = z0, f, self.init_state(z0)
        restrictable = f if isinstance(f, RestrictableMap) else None

        def write_back() -> None:
            out.index_copy_(0, rows, out_a)
            best.index_copy_(0, rows, best_a)
            iters.index_copy_(0, rows, iters_a)
            if trc is not None and trc_a is not None:  # both or neither: trc_a is trc's active rows
                trc.index_copy_(0, rows, trc_a)

        dims, norm_dtype = tuple(range(1, z0.dim())), torch.promote_types(z0.dtype, torch.float32)
        for k in range(max_iter):
            fz = fa(z)
            last = k + 1 == max_iter
            if exact and trc_a is None and limits_a is None and not last:
                # A fixed count needs no residual on the way, only whether f stayed finite: one reduction.
                finite = torch.linalg.vector_norm(fz.detach(), dim=dims, dtype=norm_dtype).isfinite()  # (A,)
                take = live & finite
                out_a = torch.where(_rows_mask(take, fz), fz.to(out.dtype), out_a)
                best_a = torch.where(take, math.nan, best_a)  # diverged rows keep NaN: never measured
                iters_a += live
                live = take
            else:
                res = relative_residual(z.detach(), fz.detach())  # (A,) bookkeeping only, NaN when diverged
                # Exact count: keep the latest finite image. Tolerance: keep the best one (NaN never compares).
                take = live & (res == res) if exact else live & (res < best_a)
                out_a = torch.where(_rows_mask(take, fz), fz.to(out.dtype), out_a)
                best_a = torch.where(take, res, best_a)
                iters_a += live
                if trc_a is not None:
                    trc_a[:, k] = torch.where(live, res, math.nan)
                live = take if exact else live & (res > tol)
            if limits_a is not None:
                live = live & (iters_a < limits_a)
            if k + 1 == max_iter:
                break
            z, state = self.step(state, z, fz)
            # A fixed count never asks the host anything: no sync in the training and export paths.
            if (not exact or limits_a is not None) and (k + 1) % check_every == 0:
                n_live = int(live.sum())  # the one host sync per check
                if n_live == 0:
                    break
                if restrictable is not None and n_live < live.shape[0]:
                    write_back()
                    keep = live.nonzero().squeeze(1)
                    rows, z, state, live = rows[keep], z[keep], self.select_state(state, keep), live[keep]
                    out_a, best_a, iters_a = out_a[keep], best_a[keep], iters_a[keep]
                    limits_a = None if limits_a is None else limits_a[keep]
                    trc_a = None if trc_a is None else trc_a[keep]
                    fa = restrictable.restrict(rows)
        write_back()
        return SolverResult(out, SolverStats(iters, best, best <= tol, trc))
