"""Names become objects here and nowhere else: config -> parts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fpdm.config import DataConfig, DiffusionConfig, ModelConfig, SolverConfig
from fpdm.data.images import ImageDataset, fashion_mnist, image_folder
from fpdm.data.latents import latent_folder
from fpdm.errors import UsageError
from fpdm.interfaces import Denoiser, Schedule, Solver
from fpdm.models.transformer import SIZES, parse_arch
from fpdm.registry import Registry, default_registry

if TYPE_CHECKING:
    from fpdm.io.checkpoint import Checkpoint


def build_solver(config: SolverConfig, registry: Registry | None = None) -> Solver:
    """The solver named by `config.name`, built with `config.options` (validated by the solver)."""
    registry = registry or default_registry()
    return registry.create("solver", config.name, **config.options)


def denoiser_options(
    config: ModelConfig, *, input_size: int, in_channels: int, num_classes: int, checkpoint: bool = False
) -> tuple[str, dict[str, Any]]:
    """The registered denoiser name and the keyword options its factory gets for this config."""
    family, size, patch = parse_arch(config.arch)
    hidden, heads, depth = SIZES[size]
    options: dict[str, Any] = {
        "input_size": input_size,
        "in_channels": in_channels,
        "patch_size": patch,
        "hidden_size": config.hidden_size or hidden,
        "num_heads": config.num_heads or heads,
        "num_classes": num_classes,
        "learn_sigma": config.learn_sigma,
        "mlp_ratio": config.mlp_ratio,
        "checkpoint": checkpoint,
    }
    if family == "fpdm":
        options.update(
            pre_depth=config.pre_depth, post_depth=config.post_depth, prepost_timestep=config.prepost_timestep
        )
    elif family == "dit":
        options["depth"] = config.depth or depth
    return family, {**options, **config.options}


def build_denoiser(
    config: ModelConfig,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int,
    checkpoint: bool = False,
    registry: Registry | None = None,
) -> Denoiser:
    registry = registry or default_registry()
    family, options = denoiser_options(
        config, input_size=input_size, in_channels=in_channels, num_classes=num_classes, checkpoint=checkpoint
    )
    return registry.create("denoiser", family, **options)


def build_schedule(config: DiffusionConfig, registry: Registry | None = None) -> Schedule:
    registry = registry or default_registry()
    return registry.create(
        "schedule",
        config.schedule,
        num_train_timesteps=config.num_train_timesteps,
        zero_terminal_snr=config.zero_terminal_snr,
        **config.options,
    )


def load_denoiser(ckpt: Checkpoint, *, ema: bool = True, registry: Registry | None = None) -> Denoiser:
    """The checkpoint's denoiser with its EMA (default) or raw weights, in eval mode."""
    registry = registry or default_registry()
    options = {**ckpt.spec.get("options", {}), "checkpoint": False}
    model = registry.create("denoiser", ckpt.spec.get("denoiser", "?"), **options)
    try:
        model.load_state_dict(ckpt.ema if ema else ckpt.model)
    except RuntimeError as exc:
        raise UsageError(f"weights in {ckpt.path} do not fit its model spec: {str(exc).splitlines()[0]}") from None
    return model.eval()


def check_compatible(saved: dict[str, Any], current: dict[str, Any], sections: tuple[str, ...]) -> None:
    """A checkpoint only resumes under the config it was trained with, `train` and `solver` aside."""
    for section in sections:
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                raise UsageError(
                    f"checkpoint was trained with {section}.{key}={old.get(key)!r}, the config says {new.get(key)!r}"
                )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for but CUDA is not available")
    return device


def build_dataset(config: DataConfig) -> ImageDataset:
    """The dataset `config.name` names."""
    if config.name == "fashion_mnist":
        return fashion_mnist(config)
    if config.name == "image_folder":
        return image_folder(config)
    if config.name == "latents":
        return latent_folder(config)
    raise UsageError(f"unknown data.name {config.name!r}; known: fashion_mnist, image_folder, latents")
