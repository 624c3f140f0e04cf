"""Sampling under a compute budget, the loop that owns the fixed-point state between timesteps.

Budgets are counted in transformer-block evaluations per sample, the paper's unit: an FPDM step costs
pre + iterations + post, a DiT step its depth. Classifier-free guidance evaluates the network twice per
sample; budgets and reports count one evaluation per sample, as the paper does, and say so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.errors import FpdmRuntimeError, PluginError, UsageError
from fpdm.interfaces import BudgetAllocator, Denoiser, ReusePolicy, Solver


class StepUpdate(Protocol):
    """One reverse step: x_{t-1} from x_t and the model output at respaced index i (shared by every sampler)."""

    def __call__(self, diffusion: GaussianDiffusion, model_output: Tensor, x: Tensor, i: int, *,
                 noise: Tensor, clip_x0: bool) -> Tensor: ...


@dataclasses.dataclass(frozen=True)
class StepStats:
    """What one sampling step spent, per-sample aggregates over the batch."""

    index: int
    timestep: int
    iterations: int  # allocated (the cap)
    iterations_mean: float  # spent
    iterations_max: int
    residual_mean: float  # final relative residual of the fixed-point solve
    residual_max: float
    blocks_mean: float


@dataclasses.dataclass(frozen=True)
class SampleResult:
    images: Tensor  # (B, C, H, W) in [-1, 1] (clipped), or latents as they are with clip_output=False
    steps: list[StepStats]
    blocks: Tensor  # (B,) block evaluations spent per sample over the whole trajectory


def plan_iterations(model: Denoiser, timesteps: Sequence[int], *, budget: int | None, iters: int,
                    allocator: BudgetAllocator) -> list[int]:
    """Fixed-point iterations per step. Without a budget: `iters` each. With one: the allocator splits what
    is left after the pre/post blocks of every step; a budget that cannot pay one iteration per step fails."""
    steps = len(timesteps)
    if iters < 0 or (budget is not None and budget < 1):
        raise UsageError(f"iterations per step must be >= 0 and a budget >= 1, got iters={iters}, budget={budget}")
    per_step = model.blocks_per_call(0)
    if model.blocks_per_call(1) == per_step:  # DiT: depth per step, nothing to allocate
        if budget is not None and steps * per_step > budget:
            raise UsageError(f"budget {budget} cannot pay for {steps} DiT steps of {per_step} blocks "
                             f"({steps * per_step} needed); use --steps {max(1, budget // per_step)} or a larger budget")
        return [0] * steps
    if budget is None:
        return [iters] * steps
    total = budget - steps * per_step
    if total < steps:
        raise UsageError(f"budget {budget} cannot pay for {steps} FPDM steps: each needs {per_step} pre/post blocks "
                         f"and at least 1 iteration, {steps * (per_step + 1)} in all")
    plan = allocator.allocate(total, list(timesteps))
    name = type(allocator).__name__
    if len(plan) != steps or any(not isinstance(n, int) or n < 1 for n in plan) or sum(plan) > total:
        raise PluginError(f"allocator {name} returned {plan!r}: need {steps} integers >= 1 summing to <= {total}")
    return plan


def plan_tolerances(allocator: BudgetAllocator, iterations: Sequence[int], timesteps: Sequence[int], *,
                    tol: float = 0.0) -> list[float]:
    """Stopping tolerance per step for `sample`: an adaptive allocator's own (tol > 0), checked, else `tol`
    at every step (0 = spend every cap)."""
    if allocator.tol <= 0:
        return [float(tol)] * len(timesteps)
    tols = allocator.tolerances(list(iterations), list(timesteps))
    if len(tols) != len(timesteps) or any(not isinstance(t, (int, float)) or not 0 <= t < math.inf for t in tols):
        raise PluginError(f"allocator {type(allocator).__name__} returned tolerances {tols!r}: "
                          f"need {len(timesteps)} finite numbers >= 0")
    return [float(t) for t in tols]


def guide(output: Tensor, scale: float, *, channels: int | None, learn_sigma: bool) -> Tensor:
    """Classifier-free guidance on a batch of conditional rows followed by the same rows unconditioned:
    uncond + scale * (cond - uncond) on the prediction channels (or the first `channels`); the learned
    variance channels stay conditional. (B2, C_out, H, W) -> (B, C_out, H, W)."""
    half = output.shape[0] // 2
    cond, uncond = output[:half], output[half:]  # slices, not chunk(): chunk pins the batch size when exported
    k = channels or (cond.shape[1] // 2 if learn_sigma else cond.shape[1])
    eps = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([eps, cond[:, k:]], dim=1)


def step_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Per-sample noise from per-sample generators: image k does not depend on the batch it is drawn in."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def sample(model: Denoiser, diffusion: GaussianDiffusion, *, generators: list[torch.Generator], shape: tuple[int, ...],
           labels: Tensor | None, update: StepUpdate, solver: Solver | None, iterations: Sequence[int],
           reuse: ReusePolicy, tol: float | Sequence[float] = 0.0, cfg_scale: float = 1.0,
           cfg_channels: int | None = None, clip_x0: bool = False, adaptive: bool = False,
           device: torch.device | str = "cpu", clip_output: bool = True,
           callback: Callable[[StepStats], None] | None = None) -> SampleResult:
    """Run the reverse process of the respaced `diffusion` for len(generators) samples of `shape` (C, H, W).

    iterations[i] is step i's iteration cap (in sampling order); `tol` is one stopping tolerance or one per
    step (`plan_tolerances`). With `adaptive`, each sample carries the iterations it did not use into its next
    step, so the total stays within the plan.
    cfg_channels limits guidance to the first channels (the official code guides 3 of 4); None guides all.
    `clip_output` clamps the final samples to [-1, 1]: right for pixels, wrong for latents (pass False).
    """
    device = torch.device(device)
    n = len(generators)
    if len(iterations) != diffusion.num_timesteps:
        raise UsageError(f"{len(iterations)} iteration counts for {diffusion.num_timesteps} steps")
    tols = [tol] * len(iterations) if isinstance(tol, (int, float)) else list(tol)
    if len(tols) != len(iterations):
        raise UsageError(f"{len(tols)} tolerances for {diffusion.num_timesteps} steps")
    guided = cfg_scale != 1.0
    if guided and labels is None:
        raise UsageError("classifier-free guidance needs a class-conditional model")
    if cfg_channels is not None and not 1 <= cfg_channels <= shape[0]:  # 0 would silently mean "all channels"
        raise UsageError(f"guided channels must be 1..{shape[0]} (the image channels), got {cfg_channels}")
    x = step_noise(generators, shape, device)  # (B, C, H, W) x_T
    y = labels
    if guided:  # one batch: conditional rows, then the same rows with the null label
        y = torch.cat([labels, torch.full_like(labels, model.num_classes)])  # type: ignore[arg-type]
    solutions: list[Tensor] = []
    carry = torch.zeros(n * (2 if guided else 1), dtype=torch.long, device=device)
    spent = torch.zeros(n, dtype=torch.long, device=device)
    history: list[StepStats] = []
    for step, i in enumerate(reversed(range(diffusion.num_timesteps))):
        t_model = diffusion.map_timesteps(torch.full((n,), i, dtype=torch.long, device=device))
        x_in, t_in = (torch.cat([x, x]), torch.cat([t_model, t_model])) if guided else (x, t_model)
        z0 = reuse.init(solutions, step)  # the list holds at most reuse.history solutions
        cap = iterations[step]
        limit = cap + carry if adaptive else cap  # adaptive: per-sample caps, what each has not spent yet
        with torch.no_grad():
            out = model(x_in, t_in, y, z0=z0, iters=limit, solver=solver, tol=tols[step])
        if out.z is not None and reuse.history:
            solutions = [*solutions, out.z][-reuse.history :]
        if adaptive and out.stats is not None:
            carry = limit - out.stats.iterations
        output = out.pred
        if guided:
            output = guide(output, cfg_scale, channels=cfg_channels, learn_sigma=diffusion.learn_sigma)
        noise = step_noise(generators, shape, device) if i > 0 else torch.zeros_like(x)
        x = update(diffusion, output, x, i, noise=noise, clip_x0=clip_x0)
        if not bool(torch.isfinite(x).all()):  # NaN images are never returned as if they were samples
            raise FpdmRuntimeError(_diverged(step, diffusion.num_timesteps, int(t_model[0]), out, history))
        blocks = out.blocks[:n]
        spent += blocks
        stats = _step_stats(step, int(t_model[0]), cap, out, blocks)
        history.append(stats)
        if callback is not None:
            callback(stats)
    return SampleResult(x.clamp(-1, 1) if clip_output else x, history, spent)


def _diverged(step: int, steps: int, timestep: int, out: Any, history: list[StepStats]) -> str:
    """One line: where sampling went non-finite, the solve's residual there and at the step before."""
    if out.z is not None and not bool(torch.isfinite(out.z).all()):
        where = "the fixed-point state"
    elif not bool(torch.isfinite(out.pred).all()):
        where = "the model output"
    else:
        where = "the sampler update"
    residual = "no fixed-point solve"
    if out.stats is not None:
        r = out.stats.residual.double()
        worst = r.nan_to_num(nan=math.inf, posinf=math.inf).max().item() if r.numel() else math.nan
        residual = f"fixed-point residual max {worst:.3g}"
        if history:
            residual += f" (step before: {history[-1].residual_max:.3g})"
    return (f"sampling diverged at step {step + 1} of {steps} (timestep {timestep}): non-finite values in {where}, "
            f"{residual}; no images written (try more iterations, a damped or another solver, or fewer steps)")


def _step_stats(step: int, timestep: int, cap: int, out: Any, blocks: Tensor) -> StepStats:
    if out.stats is None:
        return StepStats(step, timestep, cap, 0.0, 0, float("nan"), float("nan"), blocks.double().mean().item())
    s = out.stats
    return StepStats(step, timestep, cap, s.iterations.double().mean().item(), int(s.iterations.max()),
                     s.residual.double().nanmean().item(), s.residual.double().nan_to_num(nan=0.0).max().item(),
                     blocks.double().mean().item())


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    images: Tensor  # (N, C, H, W) in [-1, 1], on the CPU
    labels: Tensor | None  # (N,)
    steps: list[dict[str, float]]  # per step, aggregated over all batches
    blocks: Tensor  # (N,) block evaluations spent per sample
    seconds: float


def generate(model: Denoiser, diffusion: GaussianDiffusion, *, n: int, batch_size: int, seed: int,
             labels: Sequence[int] | None, progress: Callable[[int], None] | None = None,
             run: Callable[..., SampleResult] | None = None, **options: Any) -> GenerateResult:
    """`n` samples in batches through `sample`; sample k uses generator (seed, k), so the images do not depend
    on the batch size. `options` are `sample`'s keywords (update, solver, iterations, reuse, ...); `run` replaces
    `sample` with a callable of the same signature (an exported whole loop)."""
    import time

    device = torch.device(options.get("device", "cpu"))
    label_tensor = None if labels is None else torch.tensor([labels[k % len(labels)] for k in range(n)])
    images, blocks, per_step = [], [], []
    start = time.perf_counter()
    for first in range(0, n, batch_size):
        ks = range(first, min(first + batch_size, n))
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in ks]
        y = None if label_tensor is None else label_tensor[first : first + len(ks)].to(device)
        result = (run or sample)(model, diffusion, generators=gens, labels=y, **options)
        images.append(result.images.cpu())
        blocks.append(result.blocks.cpu())
        per_step.append((len(ks), result.steps))
        if progress is not None:
            progress(len(ks))
    return GenerateResult(torch.cat(images), label_tensor, _merge_steps(per_step), torch.cat(blocks),
                          time.perf_counter() - start)


def _merge_steps(batches: list[tuple[int, list[StepStats]]]) -> list[dict[str, float]]:
    total = sum(size for size, _ in batches)
    merged = []
    for i, first in enumerate(batches[0][1]):
        rows = [(size, steps[i]) for size, steps in batches]
        mean = lambda name: sum(size * getattr(s, name) for size, s in rows) / total  # noqa: E731
        merged.append({
            "step": i, "timestep": first.timestep, "iterations": first.iterations,
            "iterations_mean": mean("iterations_mean"), "iterations_max": max(s.iterations_max for _, s in rows),
            "residual_mean": mean("residual_mean"), "residual_max": max(s.residual_max for _, s in rows),
            "blocks_mean": mean("blocks_mean"),
        })
    return merged
