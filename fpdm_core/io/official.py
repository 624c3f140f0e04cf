"""Import checkpoints of the official FPDM / DiT code (github lukemelas/fixed-point-diffusion-models).

Reads `{"model", "ema", "opt", "args", "train_steps"}` (official train.py; DiT's saves `args` as a Namespace) or a
plain state dict with torch.load(weights_only=True), argparse.Namespace the only class let through. Shapes give
the architecture, `args` (or --arch / overrides) the heads and flags; every key is checked against the fpdm
model built from that, and the result is an fpdm run folder written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fpdm.build import denoiser_options
from fpdm.config import load_config, to_dict
from fpdm.errors import UsageError
from fpdm.io.checkpoint import list_checkpoints, save_checkpoint
from fpdm.models.transformer import SIZES, parse_arch
from fpdm.registry import Registry, default_registry

OFFICIAL_BLOCKS = 28  # official sampling iterations are 28 - pre - post: a step costs one DiT-XL/2 step
LATENT_SCALE = 0.18215  # SD-VAE latent scaling the official feature extraction applies
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


@dataclasses.dataclass(frozen=True)
class OfficialFile:
    weights: dict[str, dict[str, Tensor]]  # "model" and/or "ema", or "state_dict" for a bare state dict
    args: dict[str, Any]  # the training arguments, {} when absent
    step: int


@dataclasses.dataclass(frozen=True)
class ImportResult:
    run_dir: Path
    checkpoint: Path
    arch: str
    weights: str  # what went into model.safetensors / ema.safetensors
    config: dict[str, Any]
    spec: dict[str, Any]
    parameters: int


def read_official(path: str | Path) -> OfficialFile:
    """Load an official checkpoint file without running code from it."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"official checkpoint not found: {path}" if not path.exists() else f"{path} is not a file")
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a state dict or a dict with 'model'/'ema'")
    found = {k: obj[k] for k in ("model", "ema") if isinstance(obj.get(k), dict)}
    if not found and obj and all(isinstance(v, Tensor) for v in obj.values()):
        found = {"state_dict": obj}
    if not found:
        raise UsageError(
            f"{path} holds neither a state dict nor 'model'/'ema' entries "
            f"(its keys: {', '.join(map(str, list(obj)[:6])) or 'none'})"
        )
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    step = obj.get("train_steps")
    return OfficialFile(
        {k: _state_dict(v, f"{path} [{k}]") for k, v in found.items()},
        args,
        step if isinstance(step, int) and step >= 0 else 0,
    )


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        code = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if code:
            raise UsageError(
                f"{path} is not a plain state dict: loading it needs unpickling code ({code.group(1)}); "
                "refused (only tensors, plain values and argparse.Namespace are read)"
            ) from None
        raise UsageError(f"{path} is not a torch checkpoint readable with weights_only=True") from None
    except Exception as exc:  # torch raises several types for foreign or truncated files
        raise UsageError(
            f"{path} is not a torch checkpoint ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})"
        ) from None


def _state_dict(obj: dict[Any, Any], where: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise UsageError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        name = str(key)
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = value
    return out


def _need(sd: dict[str, Tensor], key: str, ndim: int) -> Tensor:
    if key not in sd:
        raise UsageError(f"{key} is missing: not an official DiT/FPDM state dict (keys: {', '.join(list(sd)[:3])}...)")
    if sd[key].ndim != ndim:
        raise UsageError(f"{key} has shape {tuple(sd[key].shape)}; an official DiT/FPDM has {ndim} dimensions there")
    return sd[key]


def _count(sd: dict[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def _size(hidden: int, named: Any) -> tuple[str, int | None]:
    """The size name for the arch string and the head count, from the official `args.model` (e.g. DiT-XL/2)
    when it agrees with the weights, else from the named size with this hidden size; heads None if neither."""
    if isinstance(named, str):
        try:
            size = parse_arch(named)[1]
        except UsageError:
            size = ""
        if size and SIZES[size][0] == hidden:
            return size, SIZES[size][1]
    for size, (width, heads, _) in SIZES.items():
        if width == hidden:
            return size, heads
    return min(SIZES, key=lambda s: abs(SIZES[s][0] - hidden)), None


def infer_config(
    sd: dict[str, Tensor], *, args: dict[str, Any], arch: str | None, out: Path
) -> tuple[dict[str, Any], int]:
    """(fpdm config dict, num_classes) for an official state dict; `arch` (FAMILY-SIZE/PATCH) replaces what
    the shapes say about family, width, heads, patch and DiT depth."""
    hidden, channels, patch = _need(sd, "x_embedder.proj.weight", 4).shape[:3]  # (D, C, p, p)
    tokens = _need(sd, "pos_embed", 3).shape[1]  # (1, T, D)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise UsageError(f"pos_embed has {tokens} tokens, not a square grid: not an official DiT/FPDM state dict")
    if channels != 4:
        raise UsageError(f"x_embedder.proj.weight takes {channels} channels; official models take 4 (SD-VAE latents)")
    if args.get("flow") or "y_embedder.embedding_projection.weight" in sd:
        raise UsageError(
            "flow-matching and continuous-label (DINO) official models are not supported; "
            "DDPM models with class or no labels are"
        )
    fpdm = any(k.startswith("block_fixed_point.") for k in sd)
    first = "block_fixed_point" if fpdm else "blocks.0"
    out_dim = _need(sd, "final_layer.linear.weight", 2).shape[0]  # p*p*C_out
    if out_dim not in (patch * patch * channels, 2 * patch * patch * channels):
        raise UsageError(
            f"final_layer.linear.weight has {out_dim} outputs; patch {patch} and {channels} channels "
            f"need {patch * patch * channels} or {2 * patch * patch * channels}"
        )
    table = sd.get("y_embedder.embedding_table.weight")  # (classes + 1, D)
    pre, post = _count(sd, "blocks_pre."), _count(sd, "blocks_post.")
    size, heads = _size(hidden, args.get("model"))
    model: dict[str, Any] = {
        "arch": f"{'FPDM' if fpdm else 'DiT'}-{size}/{patch}",
        "hidden_size": hidden,
        "num_heads": heads,
        "depth": None if fpdm else _count(sd, "blocks."),
        "pre_depth": pre if fpdm else 1,
        "post_depth": post if fpdm else 1,
        "mlp_ratio": _need(sd, f"{first}.mlp.fc1.weight", 2).shape[0] / hidden,
        "learn_sigma": out_dim == 2 * patch * patch * channels,
        "prepost_timestep": bool(args.get("fixed_point_pre_post_timestep_conditioning", False)),
    }
    if arch is not None:
        parse_arch(arch)  # a bad name is one line here
        model.update(arch=arch, hidden_size=None, num_heads=None, depth=None)
    num_classes = 0 if table is None else table.shape[0] - 1
    config = {
        "model": model,
        "diffusion": {
            "schedule": "linear",
            "num_train_timesteps": 1000,
            "prediction": "v" if args.get("predict_v") else "eps",
            "zero_terminal_snr": bool(args.get("use_zero_terminal_snr", False)),
        },
        "data": {
            "name": "latents",
            "image_size": grid * patch,
            "channels": channels,
            "class_conditional": num_classes > 0,
        },
        "solver": {"name": "fixed_point", "max_iter": max(1, OFFICIAL_BLOCKS - pre - post) if fpdm else 12},
        "train": {"out_dir": str(out)},
    }
    return config, num_classes


def check_keys(model: nn.Module, sd: dict[str, Tensor], *, source: str, arch: str) -> dict[str, Tensor]:
    """`sd` in the model's key order and dtypes, or one line naming the first mismatching keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    parts = [
        f"{what} {len(keys)}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", shapes))
        if keys
    ]
    if parts:
        raise UsageError(f"{source} does not fit {arch}: " + "; ".join(parts))
    seen: set[int] = set()
    out = {}
    for k, v in expected.items():
        t = sd[k].to(v.dtype)
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen or not t.is_contiguous() else t  # safetensors refuses shared storage
        seen.add(ptr)
    return out


def _choose(
    found: OfficialFile, weights: str | None, source: Path, log: Callable[[str], None]
) -> tuple[dict[str, dict[str, Tensor]], str]:
    """{"model": ..., "ema": ...} for the two weight files, and a description of the choice."""
    w = found.weights
    if "state_dict" in w:
        return {"model": w["state_dict"], "ema": w["state_dict"]}, "the state dict (model and ema)"
    if weights == "model" and "model" not in w:
        raise UsageError(f"{source} has no 'model' weights (it has: {', '.join(w)}); use --weights ema")
    if weights is None and len(w) == 2:
        return {"model": w["model"], "ema": w["ema"]}, "model -> model, ema -> ema"
    pick = weights or "ema"
    if pick not in w:
        log(f"note: {source} has no '{pick}' weights; importing 'model' instead")
        pick = "model"
    return {"model": w[pick], "ema": w[pick]}, f"'{pick}' (model and ema)"


def import_official(
    source: str | Path,
    out: str | Path,
    *,
    weights: str | None = None,
    arch: str | None = None,
    overrides: Sequence[str] = (),
    registry: Registry | None = None,
    log: Callable[[str], None] = print,
) -> ImportResult:
    """Map an official checkpoint to an fpdm run folder `out` (config.json + checkpoints/step-N/).
    weights: None keeps both sets when both exist (else ema, else model); "ema" / "model" writes that set twice."""
    source, out = Path(source), Path(out)
    if weights not in (None, "ema", "model"):
        raise UsageError(f"weights must be 'ema' or 'model', got {weights!r}")
    is_run = (out / "config.json").is_file() and bool(list_checkpoints(out / "checkpoints"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not is_run:
        raise UsageError(f"{out} exists and is not an fpdm run folder; choose another OUT")
    found = read_official(source)
    sets, described = _choose(found, weights, source, log)
    base, num_classes = infer_config(sets["ema"], args=found.args, arch=arch, out=out)
    config = load_config(overrides=list(overrides), base=base)
    if arch is None and config.model.num_heads is None:
        raise UsageError(
            f"cannot tell the attention heads of hidden size {base['model']['hidden_size']} (no official "
            "size has it): pass --set model.num_heads=N or --arch FAMILY-SIZE/PATCH"
        )
    family, options = denoiser_options(
        config.model, input_size=config.data.image_size, in_channels=config.data.channels, num_classes=num_classes
    )
    model = (registry or default_registry()).create("denoiser", family, **options)
    clean = {}
    for name, sd in sets.items():
        clean[name] = check_keys(model, sd, source=f"{source} [{name}]", arch=config.model.arch)
        model.load_state_dict(clean[name], strict=True)
    spec = {
        "denoiser": family,
        "options": options,
        "class_names": [],
        "latent": {"scale_factor": getattr(config.data, "scale_factor", LATENT_SCALE)},
    }
    config_dict = to_dict(config)
    ckpt = _write_run(out, found.step, clean, config_dict, spec)
    return ImportResult(
        out, ckpt, config.model.arch, described, config_dict, spec, sum(p.numel() for p in model.parameters())
    )


def _write_run(
    out: Path, step: int, sets: dict[str, dict[str, Tensor]], config: dict[str, Any], spec: dict[str, Any]
) -> Path:
    """Build the run folder under a hidden name, then swap it into place (an earlier fpdm run at `out` goes)."""
    from fpdm.version import __version__

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        ckpt = save_checkpoint(
            tmp / "checkpoints",
            step,
            model=sets["model"],
            ema=sets["ema"],
            optimizer=None,
            config=config,
            spec=spec,
            trainer_state=None,
            keep=1,
            fpdm_version=__version__,
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if out.exists():  # an empty folder, or an fpdm run being replaced
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "checkpoints" / ckpt.name
