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

from .errors import UsageError
from .interfaces import FixedPointMap, RestrictableMap, Solver, SolverResult, SolverStats

RESIDUAL_EPS = 1e-8


def relative_residual(z: Tensor, fz: Tensor) -> Tensor:
    """||f(z) - z|| / (||f(z)|| + eps) per sample, in fp32: scale-free, so one tol fits every model size.

    NaN where either norm is not finite (NaN/inf in the state, or a state so large its norm overflows):
    such a sample has diverged, it must not read as converged through inf / inf or x / inf.
    """
    diff = (fz.float() - z.float()).flatten(1).norm(dim=1)  # (B,)
    size = fz.float().flatten(1).norm(dim=1)  # (B,)
    res = diff / (size + RESIDUAL_EPS)
    return torch.where(torch.isfinite(diff) & torch.isfinite(size), res, math.nan)


def check_solve_args(max_iter: Any, tol: Any, check_every: Any) -> None:
    """Reject bad solve arguments with one line that says what is allowed."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
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
        max_iter: int,
        tol: float,
        check_every: int = 1,
        trace: bool = False,
    ) -> SolverResult:
        check_solve_args(max_iter, tol, check_every)
        batch, device = z0.shape[0], z0.device
        exact = tol == 0
        # Full-batch results; the loop works on the still-active rows and writes back when it compacts.
        out = torch.empty_like(z0)
        best = torch.full((batch,), math.inf if max_iter else math.nan, device=device)
        iters = torch.zeros(batch, dtype=torch.int64, device=device)
        conv = torch.zeros(batch, dtype=torch.bool, device=device)
        trc = torch.full((batch, max_iter), math.nan, device=device) if trace else None

        rows = torch.arange(batch, device=device)
        # A sample that never sees a finite image of f keeps z0 as its estimate.
        act = _Active(z0.clone(), best.clone(), iters.clone(), conv.clone(), trc)
        live = torch.ones(batch, dtype=torch.bool, device=device)
        z, fa, state = z0, f, self.init_state(z0)
        can_restrict = isinstance(f, RestrictableMap)

        for k in range(max_iter):
            fz = fa(z)
            res = relative_residual(z.detach(), fz.detach())  # (A,) bookkeeping only, never differentiated
            finite = torch.isfinite(res)
            take = live & finite if exact else live & finite & (res <= act.best)
            act.out = torch.where(_rows_mask(take, fz), fz.to(out.dtype), act.out)
            act.best = torch.where(take, res, act.best)
            act.iters += live
            act.conv |= live & (res <= tol)
            if act.trace is not None:
                act.trace[:, k] = torch.where(live, res, math.nan)
            done = ~finite if exact else ~finite | (res <= tol)
            live = live & ~done
            if k + 1 == max_iter:
                break
            z, state = self.step(state, z, fz)
            # A fixed count never asks the host anything: no sync in the training and export paths.
            if not exact and (k + 1) % check_every == 0:
                n_live = int(live.sum())  # the one host sync per check
                if n_live == 0:
                    break
                if can_restrict and n_live < live.shape[0]:
                    keep = live.nonzero().squeeze(1)
                    act.write_back(rows, out, best, iters, conv, trc)
                    rows, act = rows[keep], act.select(keep)
                    z, state, live = z[keep], self.select_state(state, keep), live[keep]
                    fa = f.restrict(rows)  # type: ignore[union-attr]
        act.write_back(rows, out, best, iters, conv, trc)
        return SolverResult(out, SolverStats(iters, best, conv, trc))


class _Active:
    """Per-sample results of the rows still in the loop (a view of the batch that shrinks on compaction)."""

    def __init__(self, out: Tensor, best: Tensor, iters: Tensor, conv: Tensor, trace: Tensor | None) -> None:
        self.out, self.best, self.iters, self.conv = out, best, iters, conv
        self.trace = None if trace is None else trace.clone()

    def select(self, keep: Tensor) -> _Active:
        trace = None if self.trace is None else self.trace[keep]
        return _Active(self.out[keep], self.best[keep], self.iters[keep], self.conv[keep], trace)

    def write_back(
        self, rows: Tensor, out: Tensor, best: Tensor, iters: Tensor, conv: Tensor, trace: Tensor | None
    ) -> None:
        out.index_copy_(0, rows, self.out)
        best.index_copy_(0, rows, self.best)
        iters.index_copy_(0, rows, self.iters)
        conv.index_copy_(0, rows, self.conv)
        if trace is not None and self.trace is not None:
            trace.index_copy_(0, rows, self.trace)
