"""The sampling choices `fpdm sample`, `fpdm eval` and `fpdm export --whole-loop` share: arguments, names ->
parts, and a checkpoint loaded for PyTorch sampling."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from fpdm.build import build_schedule, load_denoiser
from fpdm.io.checkpoint import Checkpoint, load_checkpoint
from fpdm.config import Config, from_dict
from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.errors import UsageError
from fpdm.interfaces import BudgetAllocator, Denoiser, ReusePolicy, Solver
from fpdm.registry import Registry, default_registry
from fpdm.diffusion.sampling import StepUpdate, plan_iterations, plan_tolerances
from fpdm.build import resolve_device


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
    if args.budget is None and allocator.tol <= 0 and args.allocator != "uniform":
        raise UsageError(f"--allocator {args.allocator} spreads a --budget over the steps; give --budget N "
                         "(without one every step gets --iters)")
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


@dataclass(frozen=True)
class CheckpointSampler:
    """A checkpoint made ready for PyTorch sampling with the command line's choices."""

    ckpt: Checkpoint
    config: Config
    model: Denoiser  # on `device`, EMA weights unless --no-ema
    parts: SamplingParts
    solver: Solver
    solver_name: str
    device: torch.device

    def generate_options(self) -> dict[str, Any]:
        """`generate`'s keywords for the process, solver and plan."""
        return {"update": self.parts.update, "solver": self.solver, "iterations": self.parts.iterations,
                "reuse": self.parts.reuse, "tol": self.parts.tolerances, "adaptive": self.parts.allocator.tol > 0}


def load_for_sampling(args: argparse.Namespace, path: str) -> CheckpointSampler:
    """Checkpoint -> model, sampling parts and solver, from --ema, --device, --iters, --solver and the process
    arguments (the config's solver and max_iter where they are not given)."""
    ckpt = load_checkpoint(path)
    config = from_dict(Config, ckpt.config)
    registry = default_registry()
    device = resolve_device(args.device)
    model = load_denoiser(ckpt, ema=args.ema, registry=registry).to(device)
    parts = sampling_parts(args, config, model, registry,
                           iters=args.iters if args.iters is not None else config.solver.max_iter)
    solver_name = args.solver or config.solver.name
    solver = registry.create("solver", solver_name, **({} if args.solver else config.solver.options))
    return CheckpointSampler(ckpt, config, model, parts, solver, solver_name, device)
