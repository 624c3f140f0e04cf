"""The sampling choices `fpdm sample` and `fpdm export --whole-loop` share: arguments, and names -> parts."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from fpdm.build import build_schedule
from fpdm.config import Config
from fpdm.diffusion import GaussianDiffusion
from fpdm.errors import UsageError
from fpdm.interfaces import BudgetAllocator, Denoiser, ReusePolicy
from fpdm.registry import Registry
from fpdm.sampling import StepUpdate, plan_iterations, plan_tolerances


def add_process_arguments(parser: argparse.ArgumentParser, *, steps: int | None = 50) -> None:
    parser.add_argument("--steps", type=int, default=steps, help="sampling steps (respaced)")
    parser.add_argument("--budget", type=int, help="transformer-block evaluations per sample (the paper's unit)")
    parser.add_argument("--sampler", default="ddpm", help="ddpm or ddim (or a plugin's)")
    parser.add_argument("--eta", type=float, help="DDIM eta (default 0)")
    parser.add_argument("--allocator", default="uniform", help="how --budget is spread over the steps")
    parser.add_argument("--reuse", default="reuse", help="initial iterate per step: cold, reuse, extrapolate")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--cfg-channels", type=int, help="guide only the first N channels (official: 3)")
    parser.add_argument("--clip-x0", action="store_true", help="clip predicted x0 to [-1, 1]")


@dataclass(frozen=True)
class SamplingParts:
    diffusion: GaussianDiffusion  # respaced to the sampling steps
    timesteps: list[int]  # training timesteps in sampling order (high noise first)
    update: StepUpdate
    allocator: BudgetAllocator
    reuse: ReusePolicy
    iterations: list[int]  # per step, in sampling order
    tolerances: list[float]  # per step: where a sample may stop early (an adaptive allocator's, or --tol)


def sampling_parts(args: argparse.Namespace, config: Config, model: Denoiser, registry: Registry, *,
                   iters: int) -> SamplingParts:
    """Names become objects: the respaced process, the step update, allocator, reuse policy and the plan."""
    if args.steps is None or args.steps < 1:
        raise UsageError("--steps must be >= 1")
    if args.cfg_scale != 1.0 and not model.num_classes:
        raise UsageError("this model is unconditional: --cfg-scale does not apply")
    schedule = build_schedule(config.diffusion, registry)
    base = GaussianDiffusion(schedule, prediction=config.diffusion.prediction, learn_sigma=config.model.learn_sigma)
    if args.steps > base.num_timesteps:
        raise UsageError(f"--steps must be <= {base.num_timesteps}, the training timesteps")
    timesteps = sorted(schedule.sampling_timesteps(args.steps).tolist())
    update = registry.create("sampler", args.sampler, **({} if args.eta is None else {"eta": args.eta}))
    tol = getattr(args, "tol", None) or 0.0  # commands that fix the plan (export) have no --tol
    allocator = registry.create("allocator", args.allocator)
    if allocator.tol > 0 and tol:  # --tol tunes an adaptive allocator's own tolerance
        allocator = registry.create("allocator", args.allocator, tol=tol)
    reuse = registry.create("reuse_policy", args.reuse)
    iterations = plan_iterations(model, timesteps[::-1], budget=args.budget, iters=iters, allocator=allocator)
    tolerances = plan_tolerances(allocator, iterations, timesteps[::-1], tol=tol)
    return SamplingParts(base.respace(timesteps), timesteps[::-1], update, allocator, reuse, iterations, tolerances)


def names(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling choices as plain values, for reports and metadata."""
    return {"steps": args.steps, "budget": args.budget, "sampler": args.sampler, "eta": args.eta,
            "allocator": args.allocator, "reuse": args.reuse, "cfg_scale": args.cfg_scale,
            "cfg_channels": args.cfg_channels, "clip_x0": args.clip_x0}
