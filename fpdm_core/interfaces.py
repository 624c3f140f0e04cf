"""The five extension points of fpdm and the results they return.

Every implementation, built-in or third-party, is registered by name through the plugin hooks
(`fpdm.hookspecs`) and must pass the shared conformance tests for its kind. Results are frozen dataclasses.
Tensors are positional, knobs keyword-only.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fpdm.errors import UsageError

# --------------------------------------------------------------------------------------------------------------
# Solver


@runtime_checkable
class RestrictableMap(Protocol):
    """A fixed-point map that can be cut down to some batch rows.

    A solver that stops samples one by one calls `f.restrict(rows)` to stop paying for the converged ones;
    a plain callable works too, it is then evaluated on the whole batch and converged rows are frozen.
    """

    def __call__(self, z: Tensor) -> Tensor: ...

    def restrict(self, rows: Tensor) -> RestrictableMap: ...


FixedPointMap = Callable[[Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class SolverStats:
    """Per-sample statistics of one solve. Every tensor has the batch as its first dimension.

    iterations: function evaluations spent on each sample, int64 (B,).
    residual:   relative residual ||f(z) - z|| / (||f(z)|| + eps) of the step that produced the returned
                estimate, float32 (B,). inf where f never gave a finite image; NaN where it was not measured:
                max_iter = 0, or a sample that diverged under a fixed count (tol = 0 checks only finiteness
                on the way, to stay cheap; ask for `trace` to measure every step).
    converged:  residual <= tol, bool (B,). With tol = 0 (a fixed count) only an exact fixed point counts.
    trace:      residual after every evaluation, float32 (B, max_iter), NaN after a sample stopped;
                None unless asked for.
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    trace: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.iterations.shape[0])

    def summary(self) -> dict[str, float]:
        """Batch aggregates as plain floats (for logs and JSON)."""
        its = self.iterations.double()
        res = self.residual.double()
        return {
            "iterations_mean": its.mean().item(),
            "iterations_max": its.max().item(),
            "residual_mean": res.mean().item(),
            "residual_max": res.max().item(),
            "converged_fraction": self.converged.double().mean().item(),
        }


@dataclasses.dataclass(frozen=True)
class SolverResult:
    """The solution estimate z (same shape and dtype as z0) and its per-sample stats."""

    z: Tensor
    stats: SolverStats


class Solver(abc.ABC):
    """Finds z = f(z) for a batch, each sample on its own.

    Contract shared by every solver (checked by tests/test_solver_conformance.py over the registry):
    - `solve` never toggles grad mode; the caller decides (torch.no_grad for S-JFB's no-grad phase).
    - tol > 0: a sample stops once its relative residual is <= tol and its estimate no longer changes.
    - tol = 0: exactly `max_iter` evaluations for every sample (training, budgets, export).
    - A sample whose map produces NaN/inf stops, keeps its last finite estimate and reports converged=False.
    - `check_every=k` looks at convergence on the host only every k iterations (no CPU sync in between);
      per-sample counts stay exact because the bookkeeping runs on the device.
    """

    @abc.abstractmethod
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
        """Solve z = f(z) from z0 (B, ...). Returns estimates of z0's shape and dtype.

        max_iter is one cap for all, or an int64 (B,) tensor of per-sample caps (adaptive budgets)."""

    def unrolled(self, f: FixedPointMap, z0: Tensor, *, iters: int) -> Tensor:
        """The data-independent form used by export: exactly `iters` evaluations, no host control flow.

        Must equal `solve(f, z0, max_iter=iters, tol=0).z` and use only ops ONNX has (no linalg.solve).
        A solver that cannot provide this still samples and trains; it only cannot be exported.
        """
        raise UsageError(
            f"solver {type(self).__name__} cannot be unrolled for export: a solver plugin must implement "
            "unrolled(f, z0, *, iters) -> Tensor with a fixed number of evaluations and ONNX-exportable ops"
        )

    @property
    def can_unroll(self) -> bool:
        return type(self).unrolled is not Solver.unrolled


# --------------------------------------------------------------------------------------------------------------
# Denoiser


@dataclasses.dataclass(frozen=True)
class DenoiserOutput:
    """pred: the network output (B, C_out, H, W). z: the fixed-point solution (None for DiT).
    stats: the solver's stats (None for DiT). blocks: transformer-block evaluations spent per sample (B,)."""

    pred: Tensor
    z: Tensor | None
    stats: SolverStats | None
    blocks: Tensor


class Denoiser(nn.Module, metaclass=abc.ABCMeta):
    """A diffusion network. Holds parameters only: the fixed-point state comes in as z0 and goes out as z."""

    @abc.abstractmethod
    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None,
        *,
        z0: Tensor | None = None,
        iters: int | Tensor,
        solver: Solver | None = None,
        tol: float = 0.0,
        grad_iters: int = 0,
    ) -> DenoiserOutput:
        """x (B, C, H, W), t (B,) timesteps, y (B,) labels or None. `iters` solver evaluations without grad
        (or per-sample caps, an int64 (B,) tensor), then `grad_iters` evaluations with autograd (S-JFB).
        DiT ignores the fixed-point arguments."""

    @abc.abstractmethod
    def blocks_per_call(self, iters: int) -> int:
        """Transformer-block evaluations of one call at `iters` fixed-point iterations (the budget unit)."""


# --------------------------------------------------------------------------------------------------------------
# Schedule


class Schedule(abc.ABC):
    """Noise levels of the training process and the respaced timesteps used for sampling."""

    @abc.abstractmethod
    def betas(self) -> Tensor:
        """float64 (T,) betas of the T training timesteps."""

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas().shape[0])

    def alphas_cumprod(self) -> Tensor:
        """float64 (T,) cumulative products of 1 - beta."""
        return torch.cumprod(1.0 - self.betas(), dim=0)

    def sampling_timesteps(self, steps: int) -> Tensor:
        """int64 (steps,) evenly respaced training timesteps, both ends included, highest first
        (the official respacing); a single step starts from the last timestep."""
        total = self.num_train_timesteps
        if not 1 <= steps <= total:
            raise UsageError(f"steps must be in 1..{total}, got {steps}")
        if steps == 1:
            return torch.tensor([total - 1])
        ts = torch.linspace(0, total - 1, steps, dtype=torch.float64).round().long()
        return ts.flip(0)


# --------------------------------------------------------------------------------------------------------------
# Reuse policy and budget allocator


class ReusePolicy(abc.ABC):
    """Chooses the initial iterate of each sampling step's fixed-point solve.

    `history` is how many previous solutions the sampler keeps for this policy (state lives in the sampler).
    """

    history: int = 1

    @abc.abstractmethod
    def init(self, solutions: Sequence[Tensor], step: int) -> Tensor | None:
        """solutions: earlier steps' fixed-point solutions, oldest first (empty at step 0).
        Returns z0 for this step, or None for a cold start from the pre-block output."""


class BudgetAllocator(abc.ABC):
    """Splits a sampling budget of fixed-point iterations over the sampling steps.

    `tol` > 0 makes the allocation adaptive: the sampler solves step i to `tolerances(...)[i]` (by default
    `tol` at every step), and each sample carries the iterations it did not need into its next step, the plan
    staying the total cap.
    """

    tol: float = 0.0

    @abc.abstractmethod
    def allocate(self, total_iters: int, timesteps: Sequence[int]) -> list[int]:
        """Iterations per step: one entry per timestep, each >= 1, summing to at most total_iters."""

    def tolerances(self, iterations: Sequence[int], timesteps: Sequence[int]) -> list[float]:
        """Adaptive allocators (tol > 0): the relative residual at which each step may stop early, given the
        plan `allocate` returned; 0 spends the step's whole cap. One finite value >= 0 per timestep."""
        return [float(self.tol)] * len(timesteps)
