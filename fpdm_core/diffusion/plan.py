"""Sampling choices -> the parts the sampling loop runs. Names (or instances) of the sampler, allocator and reuse
policy become objects here, the respaced process is built and the per-step iteration plan is fixed.

Shared by `Pipeline.sample`, `Pipeline.export` (a whole-loop graph bakes the same parts in) and the ONNX Runtime
step sampler of `fpdm sample MODEL.onnx`. Messages name the options as `SampleConfig` and the flags spell them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fpdm.budget import resolve_blocks
from fpdm.build import build_schedule
from fpdm.config import Config, SampleConfig
from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.diffusion.sampling import GenerateResult, StepStats, as_sampler, generate, plan_iterations, plan_tolerances
from fpdm.errors import UsageError
from fpdm.interfaces import BudgetAllocator, Denoiser, ReusePolicy, Sampler, Schedule, Solver
from fpdm.registry import Registry


@dataclasses.dataclass(frozen=True)
class SamplingParts:
    diffusion: GaussianDiffusion  # respaced to the sampling steps
    timesteps: list[float]  # the model timestep of every model evaluation, in call order (high noise first)
    sampler: Sampler  # a registered sampler (an old-style step update comes adapted)
    allocator: BudgetAllocator
    reuse: ReusePolicy
    iterations: list[int]  # per model evaluation, in call order
    tolerances: list[float]  # per evaluation: where a sample may stop early (an adaptive allocator's, or `tol`)
    names: dict[str, Any]  # the choices as plain values, for reports and export metadata

    @property
    def adaptive(self) -> bool:
        return self.allocator.tol > 0


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """What a whole-loop export bakes in: the respaced process and the choices `sample` takes by name."""

    diffusion: Any  # GaussianDiffusion, respaced
    sampler: Any  # Sampler (an old-style StepUpdate is adapted by the loop)
    iterations: list[int]
    reuse: Any  # ReusePolicy
    cfg_scale: float
    cfg_channels: int | None
    guidance_rescale: float
    clip_x0: bool
    clip_output: bool  # False for latent models
    names: dict[str, Any]  # sampler / allocator / reuse / budget, for the metadata


def base_diffusion(config: Config, registry: Registry) -> GaussianDiffusion:
    """The training process of a model's config (every training timestep)."""
    return _diffusion(config, build_schedule(config.diffusion, registry))


def _diffusion(config: Config, schedule: Schedule) -> GaussianDiffusion:
    return GaussianDiffusion(schedule, prediction=config.diffusion.prediction, learn_sigma=config.model.learn_sigma)


def sampling_parts(
    config: Config, model: Denoiser, options: SampleConfig, *, registry: Registry, iters: int
) -> SamplingParts:
    """The respaced process, step update, allocator, reuse policy and plan for `options` (`iters` per step
    without a budget)."""
    if options.cfg_scale != 1.0 and not model.num_classes:
        raise UsageError("this model is unconditional: cfg_scale (guidance) does not apply")
    schedule = build_schedule(config.diffusion, registry)
    base = _diffusion(config, schedule)
    built, sampler = _build(
        registry, "sampler", options.sampler, {} if options.eta is None else {"eta": options.eta}, "eta"
    )
    chosen = as_sampler(built, clip_x0=options.clip_x0)
    spacing = options.spacing or chosen.default_spacing  # official for ddpm/ddim, trailing for the multistep ones
    timesteps = sorted(schedule.sampling_timesteps(options.steps, spacing=spacing).tolist())
    diffusion = base.respace(timesteps)
    allocator, allocator_name = _build(registry, "allocator", options.allocator, {}, "")
    if options.budget is None and allocator.tol <= 0 and allocator_name != "uniform":
        raise UsageError(
            f"allocator {allocator_name!r} spreads a budget over the steps; give a budget "
            "(--budget N; without one every step gets iters)"
        )
    if allocator.tol > 0 and options.tol:  # `tol` tunes an adaptive allocator's own tolerance
        allocator, _ = _build(registry, "allocator", options.allocator, {"tol": options.tol}, "tol")
    reuse, reuse_name = _build(registry, "reuse_policy", options.reuse, {}, "")
    levels = chosen.levels(diffusion)
    order = [diffusion.timestep_values[i] for i in levels]  # each evaluation's model timestep
    blocks = resolve_blocks(options.budget, config)  # "10dit" -> 10 x the DiT depth of the model's size
    try:
        iterations = plan_iterations(model, order, budget=blocks, iters=iters, allocator=allocator)
    except UsageError as exc:
        if options.budget is None:
            raise
        unit = "" if blocks == options.budget else f"{options.budget} = {blocks} blocks; "
        raise UsageError(
            f"{exc} ({unit}{sampler} at {options.steps} steps makes {len(order)} model evaluations)"
        ) from None
    tolerances = plan_tolerances(allocator, iterations, order, tol=options.tol)
    names = {
        "steps": options.steps,
        "spacing": spacing,
        "budget": options.budget,
        "budget_blocks": blocks,
        "sampler": sampler,
        "eta": options.eta,
        "allocator": allocator_name,
        "reuse": reuse_name,
        "cfg_scale": options.cfg_scale,
        "cfg_channels": options.cfg_channels,
        "guidance_rescale": options.guidance_rescale,
        "clip_x0": options.clip_x0,
    }
    return SamplingParts(diffusion, order, chosen, allocator, reuse, iterations, tolerances, names)


def _build(registry: Registry, kind: str, value: Any, options: dict[str, Any], option: str) -> tuple[Any, str]:
    """A registered name built with `options`, or an instance used as it is: (object, name for reports).
    An instance cannot take `options`: they are set where it was built, so saying them here is an error."""
    if isinstance(value, str):
        return registry.create(kind, value, **options), value
    if options:
        raise UsageError(
            f"{option} applies to a {kind.replace('_', ' ')} given by name; set it on the "
            f"{type(value).__name__} instance instead"
        )
    return value, type(value).__name__


def generate_planned(
    model: Denoiser,
    parts: SamplingParts,
    options: SampleConfig,
    *,
    labels: Sequence[int] | None,
    solver: Solver | None,
    device: torch.device | str,
    clip_output: bool,
    progress: Callable[[int], object] | None = None,
    callback: Callable[[StepStats], None] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    x_T: Tensor | None = None,
) -> GenerateResult:
    """`generate` driven by a plan (`sampling_parts`) and the loop options of a SampleConfig (count, batch size,
    seed, guidance, clipping): the one call `Pipeline.sample` and the ONNX Runtime step backend share."""
    return generate(
        model,
        parts.diffusion,
        n=options.n,
        batch_size=options.batch_size,
        seed=options.seed,
        labels=labels,
        shape=(model.in_channels, model.input_size, model.input_size),
        sampler=parts.sampler,
        solver=solver,
        iterations=parts.iterations,
        reuse=parts.reuse,
        tol=parts.tolerances,
        cfg_scale=options.cfg_scale,
        cfg_channels=options.cfg_channels,
        guidance_rescale=options.guidance_rescale,
        clip_x0=options.clip_x0,
        adaptive=parts.adaptive,
        device=device,
        clip_output=clip_output,
        callback=callback,
        progress=progress,
        generators=generators,
        x_T=x_T,
    )
