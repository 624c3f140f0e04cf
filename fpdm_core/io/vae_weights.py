"""Reading and writing an `AutoencoderKL` in diffusers' folder layout: `config.json` plus
`diffusion_pytorch_model.safetensors` (or `.bin`), directly in the folder or in a pipeline's `vae/` subfolder.

Older checkpoints name the mid-block attention query/key/value/proj_attn and some store its weights as 1x1
convs (C, C, 1, 1); both are converted on load. Every problem is a one-line `UsageError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fpdm.errors import UsageError
from fpdm.models.vae import DECODER_BLOCK, ENCODER_BLOCK, AutoencoderKL, VAEConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
EXPECTED = (
    "a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors) "
    "or a pipeline folder with vae/"
)
_BUILT = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
          "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "use_quant_conv", "use_post_quant_conv",
          "mid_block_add_attention")  # fmt: skip
_IGNORED = ("force_upcast",)  # fp16 advice for pipelines; the module computes in whatever dtype it is given
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_config_from_dict(raw: dict[str, Any], *, source: str = "config.json") -> VAEConfig:
    """A diffusers AutoencoderKL config dict -> `VAEConfig`; options this implementation cannot honour are
    refused by name rather than ignored."""
    cls = raw.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise UsageError(f"{source} describes a {cls}; only diffusers' AutoencoderKL is supported")
    known = {*_BUILT, *_IGNORED, "act_fn", "down_block_types", "up_block_types", "latents_mean", "latents_std"}
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in known)
    if unknown:
        raise UsageError(
            f"{source} has unsupported AutoencoderKL option(s) {', '.join(unknown)}; "
            f"supported: {', '.join(sorted(known))}"
        )
    if raw.get("act_fn", "silu") != "silu":
        raise UsageError(f"{source} has act_fn={raw['act_fn']!r}; only 'silu' is supported")
    for key, block in (("down_block_types", ENCODER_BLOCK), ("up_block_types", DECODER_BLOCK)):
        other = sorted({b for b in raw.get(key, [block]) if b != block})
        if other:
            raise UsageError(f"{source} has {key} {other}; only {block} is supported")
    for key in ("latents_mean", "latents_std"):
        if raw.get(key) is not None:
            raise UsageError(f"{source} sets {key}; per-channel latent normalisation is not supported (null only)")
    blocks = len(raw.get("block_out_channels", [64]))
    for key in ("down_block_types", "up_block_types"):
        if key in raw and len(raw[key]) != blocks:
            raise UsageError(f"{source} has {len(raw[key])} {key} for {blocks} block_out_channels")
    kwargs = {k: raw[k] for k in _BUILT if k in raw}
    try:
        return VAEConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{source} is not a valid AutoencoderKL config: {str(exc).splitlines()[0]}") from None


def vae_config_to_dict(config: VAEConfig) -> dict[str, Any]:
    """`VAEConfig` -> a config.json diffusers' AutoencoderKL.from_pretrained reads."""
    blocks = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "down_block_types": [ENCODER_BLOCK] * blocks,
        "up_block_types": [DECODER_BLOCK] * blocks,
        **{k: getattr(config, k) for k in _BUILT},
        "block_out_channels": list(config.block_out_channels),
    }


def convert_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Legacy diffusers attention names (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0, and 1x1-conv
    attention weights (C, C, 1, 1) -> linear weights (C, C). Other keys pass through unchanged."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 4 and parts[-4:-2] == ["attentions", "0"] and parts[-2] in _LEGACY_ATTENTION:
            key = ".".join([*parts[:-2], _LEGACY_ATTENTION[parts[-2]], parts[-1]])
        if ".attentions." in key and key.endswith("weight") and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # (C, C): a 1x1 conv over positions is a linear map over channels
        out[key] = value
    return out


def resolve_vae_folder(path: str | Path) -> Path:
    """The folder holding config.json: `path` itself or its `vae/` subfolder (a pipeline folder)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UsageError(f"VAE folder {root} does not exist; expected {EXPECTED}")
    if not root.is_dir():
        raise UsageError(f"VAE path {root} is not a folder; expected {EXPECTED}")
    for folder in (root, root / "vae"):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise UsageError(f"VAE folder {root} has no {CONFIG_NAME} (nor vae/{CONFIG_NAME}); expected {EXPECTED}")


def load_vae(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """An `AutoencoderKL` from a diffusers folder, in eval mode with gradients off."""
    folder = resolve_vae_folder(path)
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {folder / CONFIG_NAME}: {exc}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{folder / CONFIG_NAME} is not a JSON object")
    config = vae_config_from_dict(raw, source=str(folder / CONFIG_NAME))
    weights = next((folder / name for name in WEIGHTS_NAMES if (folder / name).is_file()), None)
    if weights is None:
        raise UsageError(f"VAE folder {folder} has no {WEIGHTS_NAMES[0]} (nor {WEIGHTS_NAMES[1]}); expected {EXPECTED}")
    state = convert_state_dict(_read_weights(weights))
    vae = AutoencoderKL(config)
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has unexpected {unexpected[0]}"
        raise UsageError(
            f"{weights} does not fit its config.json: it {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
    bad = next((k for k in expected if expected[k].shape != state[k].shape), None)
    if bad is not None:
        raise UsageError(
            f"{weights} does not fit its config.json: {bad} has shape {tuple(state[bad].shape)}, "
            f"expected {tuple(expected[bad].shape)}"
        )
    vae.load_state_dict(state)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _read_weights(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)  # no code from a pickle
    except Exception as exc:  # corrupt or foreign files fail in many ways; all mean the same
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"cannot read VAE weights {path}: {reason}") from None
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise UsageError(f"VAE weights {path} are not a flat state dict of tensors")
    return state


def save_vae(vae: AutoencoderKL, folder: str | Path) -> Path:
    """Write `vae` in diffusers' layout (config.json + diffusion_pytorch_model.safetensors); returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(vae_config_to_dict(vae.config), indent=2))
    state = {k: t.detach().cpu().contiguous() for k, t in vae.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAMES[0]))
    return folder


def latent_decoder(
    spec: dict[str, Any], vae_path: str | None, *, in_channels: int, input_size: int, device: torch.device
) -> Callable[[Tensor], Tensor] | None:
    """None for a pixel model; for a latent model (spec["latent"]) a function latents (N, C, H, W) -> images
    (N, out_channels, H*f, W*f) in [-1, 1] through the VAE at `vae_path`. Mismatches are one-line UsageErrors."""
    latent = spec.get("latent")
    if latent is None:
        if vae_path is not None:
            raise UsageError(
                f"--vae applies to latent models only; this checkpoint generates ({in_channels}, "
                f"{input_size}, {input_size}) images directly"
            )
        return None
    if vae_path is None:
        raise UsageError(
            f"this checkpoint generates latents of shape ({in_channels}, {input_size}, {input_size}); "
            "pass --vae DIR holding a diffusers AutoencoderKL "
            "(config.json + diffusion_pytorch_model.safetensors)"
        )
    vae = load_vae(vae_path, device=device)
    if vae.config.latent_channels != in_channels:
        raise UsageError(
            f"the VAE at {vae_path} has {vae.config.latent_channels} latent channels; this checkpoint "
            f"generates {in_channels}"
        )
    scale = float(latent["scale_factor"])

    def decode(latents: Tensor, batch_size: int = 16) -> Tensor:
        out = []
        with torch.no_grad():
            for chunk in latents.split(batch_size):
                out.append(vae.decode_latents(chunk.to(device), scale_factor=scale).cpu())  # (b, C, H*f, W*f)
        return torch.cat(out)

    return decode
