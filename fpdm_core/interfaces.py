"""The extension points of fpdm and the results they return.

Every implementation, built-in or third-party, is registered by name through the plugin hooks
(`fpdm.hookspecs`) and must pass the shared conformance tests for its kind. Results are frozen dataclasses.
Tensors are positional, knobs keyword-only.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fpdm.errors import UsageError
from fpdm.spacing import DEFAULT_SPACING, karras_timesteps, spaced_timesteps

if TYPE_CHECKING:  # the process holds the tables samplers read; it imports this module, so only for types
    from fpdm.diffusion.gaussian import GaussianDiffusion

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

    Contract shared by every solver (fpdm.testing's solver suite checks it, over the whole registry in tests):
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
    """A diffusion network. Holds parameters only: the fixed-point state comes in as z0 and goes out as z.

    Every denoiser says what it takes: x of (in_channels, input_size, input_size), and labels 0..num_classes-1
    plus num_classes itself, the null label of classifier-free guidance (num_classes 0: unconditional)."""

    in_channels: int
    input_size: int
    num_classes: int

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

    def block_modules(self) -> list[nn.Module]:
        """The transformer blocks, each a module called once per block evaluation: what training compiles one
        by one, and what a wrapper hooks to count evaluations. None by default (nothing to compile per block)."""
        return []


@dataclasses.dataclass(frozen=True)
class FixedPointProblem:
    """Everything a fixed-point denoiser computed before its solve, for one batch.

    start:   the cold-start iterate (B, T, D): the pre-layer output.
    f:       the map z -> z whose fixed point the solve finds (restrictable to rows: `RestrictableMap`).
    context: what `finish` needs besides z (the conditioning of the post blocks); opaque to callers.
    """

    start: Tensor
    f: FixedPointMap
    context: Any


class FixedPointDenoiser(Denoiser):
    """A denoiser whose middle is one map iterated to a fixed point: pre -> injection -> solve -> post.

    It exposes the pieces around the solve, so the same model runs with a solver's own `solve` (sampling,
    training) or with `solver.unrolled` (export), warm-started from any z0:
        problem = model.prepare(x, t, y); z = solve(problem.f, z0 or problem.start); pred = model.finish(z, problem)
    `forward(x, t, y, z0=..., iters=..., solver=..., tol=...)` must compute exactly that (plus S-JFB's grad
    iterations). One call costs pre_depth + iterations + post_depth block evaluations.
    """

    pre_depth: int
    post_depth: int

    @abc.abstractmethod
    def prepare(self, x: Tensor, t: Tensor, y: Tensor | None) -> FixedPointProblem:
        """Embeddings, pre blocks and the input injection: x (B, C, H, W), t (B,), y (B,) or None."""

    @abc.abstractmethod
    def finish(self, z: Tensor, problem: FixedPointProblem) -> Tensor:
        """Post blocks and the final layer: z (B, T, D) -> the prediction (B, C_out, H, W)."""

    def blocks_per_call(self, iters: int) -> int:
        return self.pre_depth + iters + self.post_depth


def is_fixed_point(model: object) -> bool:
    """Whether a denoiser spends fixed-point iterations per call: a `FixedPointDenoiser`, or a stand-in that is
    not a module (an exported graph behind the Denoiser call) declaring `fixed_point = True` from its metadata."""
    return isinstance(model, FixedPointDenoiser) or getattr(model, "fixed_point", False) is True


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

    def sampling_timesteps(self, steps: int, *, spacing: str = DEFAULT_SPACING) -> Tensor:
        """(steps,) distinct training timesteps, highest first, placed by `spacing` (one of `fpdm.spacing.SPACINGS`;
        "official" is guided-diffusion's respacing, a single step starting from the last timestep): int64, or
        float64 fractional timesteps for "karras" (Karras et al.'s sigmas). A UsageError for an unknown spacing
        or steps outside 1..T."""
        if spacing == "karras":
            return karras_timesteps(self.alphas_cumprod(), steps)
        return spaced_timesteps(self.num_train_timesteps, steps, spacing=spacing)


# --------------------------------------------------------------------------------------------------------------
# Reuse policy and budget allocator


class ReusePolicy(abc.ABC):
    """Chooses the initial iterate of each model evaluation's fixed-point solve.

    `history` is how many previous solutions the sampling run keeps for this policy (state lives in the run).
    A policy implements `init`; one that uses the noise levels (uneven steps, a multistep sampler's repeated
    levels) overrides `warm_start`, which the sampling run calls.
    """

    history: int = 1

    @abc.abstractmethod
    def init(self, solutions: Sequence[Tensor], step: int) -> Tensor | None:
        """solutions: earlier evaluations' fixed-point solutions, oldest first (empty at the first).
        step: this evaluation's position in the run. Returns z0, or None for a cold start from the pre-block
        output."""

    def warm_start(
        self, solutions: Sequence[Tensor], step: int, *, levels: Sequence[float], level: float
    ) -> Tensor | None:
        """`init` with the noise levels: levels[j] is the model timestep (a float, fractional under karras
        spacing) at which solutions[j] was found, `level` this evaluation's. Levels may repeat (Heun and UniPC
        evaluate twice at one level). The default ignores them."""
        return self.init(solutions, step)


class BudgetAllocator(abc.ABC):
    """Splits a sampling budget of fixed-point iterations over a run's model evaluations.

    `timesteps` holds the model timestep of every evaluation in call order, noisiest first: floats (fractional
    under karras spacing) that may repeat (Heun and UniPC evaluate twice at one level). One-evaluation-per-step
    samplers give one per step.
    `tol` > 0 makes the allocation adaptive: the run solves evaluation i to `tolerances(...)[i]` (by default
    `tol` everywhere), and each sample carries the iterations it did not need into its next evaluation, the
    plan staying the total cap.
    """

    tol: float = 0.0

    @abc.abstractmethod
    def allocate(self, total_iters: int, timesteps: Sequence[float]) -> list[int]:
        """Iterations per evaluation: one entry per timestep, each >= 1, summing to at most total_iters."""

    def tolerances(self, iterations: Sequence[int], timesteps: Sequence[float]) -> list[float]:
        """Adaptive allocators (tol > 0): the relative residual at which each evaluation may stop early, given
        the plan `allocate` returned; 0 spends the whole cap. One finite value >= 0 per timestep."""
        return [float(self.tol)] * len(timesteps)


# --------------------------------------------------------------------------------------------------------------
# Sampler


@dataclasses.dataclass(frozen=True)
class Denoised:
    """One model evaluation as a sampler sees it; x0 and eps have x's shape (B, C, H, W).

    x0:     the predicted clean sample, clamped to [-1, 1] when the run clips x0.
    eps:    the noise consistent with x_t and x0: the model's own (converted from v), or re-derived from the
            clamped x0 when clipping.
    output: the guided network output (B, C_out, H, W): the prediction channels, then the learned-variance
            channels when the model has them (what DDPM's variance reads).
    """

    x0: Tensor
    eps: Tensor
    output: Tensor


class Evaluate(Protocol):
    """The model as samplers call it: x (B, C, H, W) at noise level t -> `Denoised`.

    t is an index into the respaced process's steps (`diffusion.num_timesteps - 1` is the noisiest): every
    noise level a sampler visits is one of the process's, fractional model timesteps included (karras spacing
    respaces to them). Guidance, the fixed-point solve (its warm start and iteration cap), the prediction-type
    conversion and the accounting happen behind the call.
    """

    def __call__(self, x: Tensor, t: int) -> Denoised: ...


class NoiseSource(Protocol):
    """The k-th noise draw of a run (k = 0, 1, ... asked for in order), x's shape (B, C, H, W).

    Sampling draws it from per-sample generators, so image b depends only on its own generator; an exported
    loop reads row k of an input tensor (S, B, C, H, W)."""

    def __call__(self, k: int) -> Tensor: ...


class Sampler(abc.ABC):
    """Integrates the reverse process over the model evaluation: `sampler(evaluate, x_T, diffusion, *, noise)
    -> x_0`, one signature for every sampler (k-diffusion style).

    The noise levels are the respaced process's: index i has alphas_cumprod[i] (VP alpha = sqrt(ac), sigma =
    sqrt(1 - ac)), i = num_timesteps - 1 the noisiest; after index 0 comes the data (sigma = 0). Under a
    zero-terminal-SNR schedule the noisiest level has alpha = 0 (an infinite EDM sigma): a sampler takes its
    first step in the x0 limit there.

    Contract (the same sampler object runs eagerly and is traced into an exported whole loop):
    - calls `evaluate` once per entry of `levels(diffusion)`, at those indices and in that order (the plan
      holds one iteration cap per evaluation, allocated over these levels);
    - draws randomness only from `noise(k)`, k = 0, 1, ... in order, and none when `deterministic`;
    - keeps any history (a multistep method's previous x0) as local tensors of the call, never on the object;
    - uses tensor ops on x only: no host syncs, no Python branches on tensor values.
    `order` is the method's nominal order of accuracy. Options are fields of a frozen attrs class (DDIM's eta).
    """

    order: int = 1
    # The spacing used when none is given: guided-diffusion's "official" for DDPM and DDIM; samplers whose last
    # step jumps to the data waste an evaluation at t = 0 under it, and say "trailing".
    default_spacing: str = DEFAULT_SPACING

    @property
    def deterministic(self) -> bool:
        """True when the samples depend on x_T alone (no noise drawn after it)."""
        return True

    def levels(self, diffusion: GaussianDiffusion) -> list[int]:
        """The respaced index of every model evaluation of one run, in call order (one per step, noisiest
        first, unless the method says otherwise)."""
        return list(reversed(range(diffusion.num_timesteps)))

    def evaluations(self, diffusion: GaussianDiffusion) -> int:
        """Model evaluations of one run over `diffusion`'s steps: len(levels(diffusion))."""
        return len(self.levels(diffusion))

    @abc.abstractmethod
    def __call__(self, evaluate: Evaluate, x: Tensor, diffusion: GaussianDiffusion, *, noise: NoiseSource) -> Tensor:
        """x_T (B, C, H, W) -> x_0 of the same shape, along `diffusion`'s respaced steps."""
