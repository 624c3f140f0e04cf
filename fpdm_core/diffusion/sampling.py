"""Sampling under a compute budget: plans, the noise sources, and the loop that runs a sampler over one
`ModelEvaluation` per batch (which owns the fixed-point state between evaluations).

Budgets are counted in transformer-block evaluations per sample, the paper's unit: an FPDM evaluation costs
pre + iterations + post, a DiT evaluation its depth. Classifier-free guidance evaluates the network twice per
sample; budgets and reports count one evaluation per sample, as the paper does, and say so.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs
import torch
from torch import Tensor

from fpdm.diffusion.evaluation import ModelEvaluation, StepStats, guide
from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.errors import PluginError, UsageError
from fpdm.interfaces import (
    BudgetAllocator,
    Denoiser,
    Evaluate,
    NoiseSource,
    ReusePolicy,
    Sampler,
    Solver,
    is_fixed_point,
)

__all__ = [
    "GenerateResult",
    "GeneratorNoise",
    "SampleResult",
    "StepStats",
    "StepUpdate",
    "StepUpdateSampler",
    "TensorNoise",
    "as_sampler",
    "generate",
    "generate_batches",
    "guide",
    "plan_iterations",
    "plan_tolerances",
    "sample",
    "step_noise",
]


def plan_iterations(
    model: Denoiser, timesteps: Sequence[float], *, budget: int | None, iters: int, allocator: BudgetAllocator
) -> list[int]:
    """Fixed-point iterations per model evaluation (`timesteps` holds each evaluation's model timestep). Without
    a budget: `iters` each. With one: the allocator splits what is left after the pre/post blocks of every
    evaluation; a budget that cannot pay one iteration per evaluation fails."""
    steps = len(timesteps)
    if iters < 0 or (budget is not None and budget < 1):
        raise UsageError(f"iterations per step must be >= 0 and a budget >= 1, got iters={iters}, budget={budget}")
    per_step = model.blocks_per_call(0)
    if not is_fixed_point(model):  # DiT: depth per step, nothing to allocate
        if budget is not None and steps * per_step > budget:
            raise UsageError(
                f"budget {budget} cannot pay for {steps} DiT model evaluations of {per_step} blocks "
                f"({steps * per_step} needed); {budget // per_step} fit: lower --steps or raise the budget"
            )
        return [0] * steps
    if budget is None:
        return [iters] * steps
    total = budget - steps * per_step
    if total < steps:
        raise UsageError(
            f"budget {budget} cannot pay for {steps} FPDM model evaluations: each needs {per_step} pre/post "
            f"blocks and at least 1 iteration, {steps * (per_step + 1)} in all"
        )
    plan = allocator.allocate(total, list(timesteps))
    name = type(allocator).__name__
    if len(plan) != steps or any(not isinstance(n, int) or n < 1 for n in plan) or sum(plan) > total:
        raise PluginError(f"allocator {name} returned {plan!r}: need {steps} integers >= 1 summing to <= {total}")
    return plan


def plan_tolerances(
    allocator: BudgetAllocator, iterations: Sequence[int], timesteps: Sequence[float], *, tol: float = 0.0
) -> list[float]:
    """Stopping tolerance per step for `sample`: an adaptive allocator's own (tol > 0), checked, else `tol`
    at every step (0 = spend every cap)."""
    if allocator.tol <= 0:
        return [float(tol)] * len(timesteps)
    tols = allocator.tolerances(list(iterations), list(timesteps))
    if len(tols) != len(timesteps) or any(not isinstance(t, (int, float)) or not 0 <= t < math.inf for t in tols):
        raise PluginError(
            f"allocator {type(allocator).__name__} returned tolerances {tols!r}: "
            f"need {len(timesteps)} finite numbers >= 0"
        )
    return [float(t) for t in tols]


class StepUpdate(Protocol):
    """The old step-update plugin: x_{t-1} from x_t and the guided model output at respaced index i.
    Still accepted wherever a sampler is (`as_sampler` adapts it)."""

    def __call__(
        self, diffusion: GaussianDiffusion, model_output: Tensor, x: Tensor, i: int, *, noise: Tensor, clip_x0: bool
    ) -> Tensor: ...


@attrs.frozen
class StepUpdateSampler(Sampler):
    """A `StepUpdate` run as a `Sampler`: one evaluation and one update per step, noise drawn at every step
    but the last (the draws the step-update loop always made, so its images do not change)."""

    update: StepUpdate
    clip_x0: bool = False

    @property
    def deterministic(self) -> bool:
        return False  # it may use the noise it is given: nothing says it does not

    def __call__(self, evaluate: Evaluate, x: Tensor, diffusion: GaussianDiffusion, *, noise: NoiseSource) -> Tensor:
        for step, i in enumerate(reversed(range(diffusion.num_timesteps))):
            output = evaluate(x, i).output
            added = noise(step) if i > 0 else torch.zeros_like(x)
            x = self.update(diffusion, output, x, i, noise=added, clip_x0=self.clip_x0)
        return x


def as_sampler(sampler: Sampler | StepUpdate, *, clip_x0: bool = False) -> Sampler:
    """A `Sampler` as it is; an old-style step update wrapped in `StepUpdateSampler`; anything else refused."""
    if isinstance(sampler, Sampler):
        return sampler
    if callable(sampler):
        return StepUpdateSampler(sampler, clip_x0=clip_x0)
    raise PluginError(f"sampler {type(sampler).__name__} is neither an fpdm.Sampler nor a step-update callable")


def step_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Per-sample noise from per-sample generators: image k does not depend on the batch it is drawn in."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)  # (B, *shape)


class GeneratorNoise:
    """The `NoiseSource` of eager sampling: draw k from every sample's own generator, in order."""

    def __init__(self, generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> None:
        self.generators, self.shape, self.device, self.drawn = generators, shape, device, 0

    def __call__(self, k: int) -> Tensor:
        if k != self.drawn:  # generators only go forward: draw k is the k-th draw or it is not reproducible
            raise PluginError(f"the sampler asked for noise draw {k} after {self.drawn} draws; draws go in order")
        self.drawn += 1
        return step_noise(self.generators, self.shape, self.device)


@dataclasses.dataclass(frozen=True)
class TensorNoise:
    """The `NoiseSource` of an exported loop: row k of an input (S, B, C, H, W); zeros like `like` without one."""

    noise: Tensor | None
    like: Tensor

    def __call__(self, k: int) -> Tensor:
        return torch.zeros_like(self.like) if self.noise is None else self.noise[k]


@dataclasses.dataclass(frozen=True)
class SampleResult:
    images: Tensor  # (B, C, H, W) in [-1, 1] (clipped), or latents as they are with clip_output=False
    steps: list[StepStats]  # one per model evaluation
    blocks: Tensor  # (B,) block evaluations spent per sample over the whole trajectory


def sample(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    *,
    generators: list[torch.Generator],
    shape: tuple[int, ...],
    labels: Tensor | None,
    sampler: Sampler | StepUpdate,
    solver: Solver | None,
    iterations: Sequence[int],
    reuse: ReusePolicy,
    tol: float | Sequence[float] = 0.0,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    guidance_rescale: float = 0.0,
    clip_x0: bool = False,
    adaptive: bool = False,
    device: torch.device | str = "cpu",
    clip_output: bool = True,
    callback: Callable[[StepStats], None] | None = None,
    x_T: Tensor | None = None,
) -> SampleResult:
    """Run `sampler` over the respaced `diffusion` for len(generators) samples of `shape` (C, H, W).

    iterations[k] is the k-th model evaluation's iteration cap (in sampling order); `tol` is one stopping
    tolerance or one per evaluation (`plan_tolerances`). With `adaptive`, each sample carries the iterations it
    did not use into its next evaluation, so the total stays within the plan.
    cfg_channels limits guidance to the first channels (the official code guides 3 of 4); None guides all.
    `guidance_rescale` is Lin et al.'s phi (`fpdm.diffusion.evaluation.guide`). `clip_output` clamps the final
    samples to [-1, 1]: right for pixels, wrong for latents (pass False).
    `callback` sees every evaluation's StepStats as it completes. `x_T` (B, C, H, W) replaces the starting
    noise; each generator still makes its first draw, so the noise that follows is the same as without it.
    """
    device = torch.device(device)
    chosen = as_sampler(sampler, clip_x0=clip_x0)
    evaluations = chosen.evaluations(diffusion)
    if len(iterations) != evaluations:
        per = "" if evaluations == diffusion.num_timesteps else f" ({evaluations} model evaluations)"
        raise UsageError(f"{len(iterations)} iteration counts for {diffusion.num_timesteps} steps{per}")
    if cfg_channels is not None and not 1 <= cfg_channels <= shape[0]:  # 0 would silently mean "all channels"
        raise UsageError(f"guided channels must be 1..{shape[0]} (the image channels), got {cfg_channels}")
    evaluate = ModelEvaluation(
        model,
        diffusion,
        labels=labels,
        solver=solver,
        iterations=iterations,
        reuse=reuse,
        tol=tol,
        adaptive=adaptive,
        cfg_scale=cfg_scale,
        cfg_channels=cfg_channels,
        guidance_rescale=guidance_rescale,
        clip_x0=clip_x0,
        solve="solving",
        callback=callback,
    )
    x = step_noise(generators, shape, device)  # (B, C, H, W) x_T, each sample's first draw
    if x_T is not None:
        if tuple(x_T.shape) != tuple(x.shape):
            raise UsageError(f"x_T must have shape {tuple(x.shape)}, got {tuple(x_T.shape)}")
        x = x_T.to(device=device, dtype=x.dtype)
    x = chosen(evaluate, x, diffusion, noise=GeneratorNoise(generators, shape, device))
    evaluate.check_output(x)
    assert evaluate.spent is not None  # at least one evaluation ran: check_output counted them
    return SampleResult(x.clamp(-1, 1) if clip_output else x, evaluate.history, evaluate.spent)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    images: Tensor  # (N, C, H, W) in [-1, 1], on the CPU
    labels: Tensor | None  # (N,)
    steps: list[dict[str, float]]  # per model evaluation, aggregated over all batches
    blocks: Tensor  # (N,) block evaluations spent per sample
    seconds: float


class BatchSampler(Protocol):
    """One batch of samples from their generators, labels and, when given, starting noise x_T (`sample` with
    everything else fixed, or an exported whole loop)."""

    def __call__(
        self, generators: list[torch.Generator], labels: Tensor | None, x_T: Tensor | None, /
    ) -> SampleResult: ...


def generate(
    model: Denoiser,
    diffusion: GaussianDiffusion,
    *,
    n: int,
    batch_size: int,
    seed: int,
    labels: Sequence[int] | None,
    shape: tuple[int, ...],
    sampler: Sampler | StepUpdate,
    solver: Solver | None,
    iterations: Sequence[int],
    reuse: ReusePolicy,
    tol: float | Sequence[float] = 0.0,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    guidance_rescale: float = 0.0,
    clip_x0: bool = False,
    adaptive: bool = False,
    device: torch.device | str = "cpu",
    clip_output: bool = True,
    callback: Callable[[StepStats], None] | None = None,
    progress: Callable[[int], object] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    x_T: Tensor | None = None,
) -> GenerateResult:
    """`n` samples in batches through `sample` (the keywords they share are sample's); sample k uses generator
    (seed, k), so the images do not depend on the batch size. `generators` (one per sample) replace the seeded
    ones; `x_T` (n, C, H, W) is the starting noise."""

    def run(gens: list[torch.Generator], y: Tensor | None, start: Tensor | None) -> SampleResult:
        return sample(
            model,
            diffusion,
            generators=gens,
            shape=shape,
            labels=y,
            sampler=sampler,
            solver=solver,
            iterations=iterations,
            reuse=reuse,
            tol=tol,
            cfg_scale=cfg_scale,
            cfg_channels=cfg_channels,
            guidance_rescale=guidance_rescale,
            clip_x0=clip_x0,
            adaptive=adaptive,
            device=device,
            clip_output=clip_output,
            callback=callback,
            x_T=start,
        )

    return generate_batches(
        run,
        n=n,
        batch_size=batch_size,
        seed=seed,
        labels=labels,
        device=device,
        progress=progress,
        generators=generators,
        x_T=x_T,
    )


def generate_batches(
    run: BatchSampler,
    *,
    n: int,
    batch_size: int,
    seed: int,
    labels: Sequence[int] | None,
    device: torch.device | str = "cpu",
    progress: Callable[[int], object] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    x_T: Tensor | None = None,
) -> GenerateResult:
    """`n` samples from `run` in batches of `batch_size`; sample k gets generator (seed, k) (or generators[k]),
    x_T[k] when given, and label labels[k % len(labels)], whatever batch it falls in."""
    if n < 1 or batch_size < 1:
        raise UsageError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    if generators is not None and len(generators) != n:
        raise UsageError(f"{len(generators)} generators for n={n} samples: give one per sample")
    if x_T is not None and x_T.shape[0] != n:
        raise UsageError(f"x_T holds {x_T.shape[0]} samples for n={n}")
    label_tensor = None if labels is None else torch.tensor([labels[k % len(labels)] for k in range(n)])
    images, blocks, per_step = [], [], []
    start = time.perf_counter()
    for first in range(0, n, batch_size):
        ks = range(first, min(first + batch_size, n))
        if generators is None:
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in ks]
        else:
            gens = list(generators[first : ks.stop])
        y = None if label_tensor is None else label_tensor[first : ks.stop].to(device)
        result = run(gens, y, None if x_T is None else x_T[first : ks.stop])
        images.append(result.images.cpu())
        blocks.append(result.blocks.cpu())
        per_step.append((len(ks), result.steps))
        if progress is not None:
            progress(len(ks))
    return GenerateResult(
        torch.cat(images), label_tensor, _merge_steps(per_step), torch.cat(blocks), time.perf_counter() - start
    )


def _merge_steps(batches: list[tuple[int, list[StepStats]]]) -> list[dict[str, float]]:
    total = sum(size for size, _ in batches)
    merged = []
    for i, first in enumerate(batches[0][1]):
        rows = [(size, steps[i]) for size, steps in batches]

        def mean(name: str, rows: list[tuple[int, StepStats]] = rows) -> float:  # sample-weighted over batches
            return sum(size * getattr(s, name) for size, s in rows) / total

        merged.append(
            {
                "step": i,
                "timestep": first.timestep,
                "iterations": first.iterations,
                "iterations_mean": mean("iterations_mean"),
                "iterations_max": max(s.iterations_max for _, s in rows),
                "residual_mean": mean("residual_mean"),
                "residual_max": max(s.residual_max for _, s in rows),
                "blocks_mean": mean("blocks_mean"),
            }
        )
    return merged
