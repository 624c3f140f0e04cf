"""The packed model folder: what `fpdm pack RUN --out DIR` and `Pipeline.save_pretrained(DIR)` write to share a
model, and what `fpdm.load(DIR)` reads.

    DIR/model.safetensors  the weights (EMA by default) in the dtype asked: fp32, bf16 or fp16
    DIR/config.toml        [fpdm] format, fpdm version, weights, dtype, step; [config] the run's config; [spec] how
                           to rebuild the denoiser (name, options, class names, latent info); [files] the sha256
                           of every other file in the folder
    DIR/README.md          a model card

No optimizer state: a packed folder samples, exports and evaluates; resuming training needs the run folder.
The folder is written under a hidden temporary name and renamed into place, and loading verifies every hash.
TOML has no null, so None values are left out of their tables and listed (as key paths) in [fpdm] nulls.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from fpdm.errors import UsageError
from fpdm.io.checkpoint import fsync, sha256_file

FORMAT = "fpdm-packed"
FORMAT_VERSION = 1
CONFIG_NAME = "config.toml"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclasses.dataclass(frozen=True)
class PackedModel:
    path: Path
    config: dict[str, Any]  # the run's config, as `fpdm.config.to_dict` wrote it
    spec: dict[str, Any]  # {"denoiser", "options", "class_names", "latent"?}
    weights: dict[str, Tensor]  # in the stored dtype
    info: dict[str, Any]  # the [fpdm] table: format, format_version, fpdm_version, weights, dtype, step


def is_packed(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def write_packed(
    out: str | Path,
    *,
    state: dict[str, Tensor],
    config: dict[str, Any],
    spec: dict[str, Any],
    step: int | None,
    weights: str,
    dtype: str,
    parameters: int,
    command: str,
    fpdm_version: str,
) -> Path:
    """Write the packed folder `out` atomically: a complete new folder or, on any failure, what was there before.
    An existing `out` is replaced only if it is empty or a packed folder itself."""
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out).expanduser()
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        cast = {
            k: (t.to(DTYPES[dtype]) if t.is_floating_point() else t).detach().contiguous().cpu()
            for k, t in state.items()
        }
        save_file(cast, tmp / WEIGHTS_NAME, metadata={"format": FORMAT, "weights": weights, "dtype": dtype})
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fpdm_version": fpdm_version,
            "weights": weights,
            "dtype": dtype,
            "parameters": parameters,
            "command": command,
        }
        if step is not None:
            info["step"] = step
        (tmp / CARD_NAME).write_text(model_card(out, config=config, spec=spec, info=info), encoding="utf-8")
        files = {name: sha256_file(tmp / name) for name in (WEIGHTS_NAME, CARD_NAME)}
        body, nulls = _without_nulls({"config": config, "spec": spec})
        text = dumps_toml({"fpdm": {**info, "nulls": nulls}, **body, "files": files})
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        for name in (*files, CONFIG_NAME):
            fsync(tmp / name)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir() or (any(out.iterdir()) and not is_packed(out)):
        raise UsageError(f"{out} exists and is not a packed fpdm model folder; choose another --out")


def _swap(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; a folder already at `out` is moved aside first and deleted last."""
    aside = None
    if out.exists():
        aside = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(out, aside)
    os.rename(tmp, out)
    fsync(out.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def read_packed(path: str | Path) -> PackedModel:
    """Read and verify a packed folder; every problem is one UsageError line naming the file."""
    path = Path(path).expanduser()
    file = path / CONFIG_NAME
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"unreadable {file}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"bad TOML in {file}: {exc}") from None
    info = data.get("fpdm")
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UsageError(f"{path} is not a packed fpdm model folder: {file} has no [fpdm] format = {FORMAT!r}")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UsageError(f"{path} has packed format {version!r}; this fpdm reads up to {FORMAT_VERSION}")
    files = data.get("files")
    if not isinstance(files, dict) or WEIGHTS_NAME not in files:
        raise UsageError(f"{file} has no [files] table with the sha256 of {WEIGHTS_NAME}")
    for name, digest in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise UsageError(f"{file} lists {name!r} in [files]: only plain file names of this folder are allowed")
        if not (path / name).is_file():
            raise UsageError(f"packed file missing: {path / name}")
        if sha256_file(path / name) != digest:
            raise UsageError(f"packed file corrupt (checksum mismatch): {path / name}")
    body = _with_nulls({"config": data.get("config"), "spec": data.get("spec")}, info.get("nulls", []), file)
    for section in ("config", "spec"):
        if not isinstance(body[section], dict):
            raise UsageError(f"{file} has no [{section}] table")
    try:
        weights = load_file(path / WEIGHTS_NAME)
    except (OSError, SafetensorError, ValueError) as exc:
        raise UsageError(f"unreadable weights {path / WEIGHTS_NAME}: {exc}") from None
    return PackedModel(path, body["config"], body["spec"], weights, info)


def _without_nulls(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[list[str]]]:
    """`data` without its None values (at any depth of tables) and the key paths they were at."""
    clean: dict[str, Any] = {}
    nulls: list[list[str]] = []
    for key, value in data.items():
        if value is None:
            nulls.append([*prefix, key])
        elif isinstance(value, dict):
            clean[key], inner = _without_nulls(value, (*prefix, key))
            nulls.extend(inner)
        else:
            clean[key] = value
    return clean, nulls


def _with_nulls(data: dict[str, Any], nulls: Any, file: Path) -> dict[str, Any]:
    if not isinstance(nulls, list) or not all(
        isinstance(p, list) and p and all(isinstance(k, str) for k in p) for p in nulls
    ):
        raise UsageError(f"{file}: [fpdm] nulls must be a list of key paths")
    for keys in nulls:
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {}) if isinstance(node, dict) else node
        if isinstance(node, dict):
            node[keys[-1]] = None
    return data


# ---------------------------------------------------------------------------------------------- TOML writing
def dumps_toml(data: dict[str, Any]) -> str:
    """TOML for the values configs hold: str, int, float, bool, lists of them (nested too) and nested tables.
    Tables are written as [a.b] sections; `tomllib.loads(dumps_toml(d)) == d` for every such `d`."""
    lines: list[str] = []
    _table(data, (), lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _table(data: dict[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if path and (len(tables) < len(data) or not tables):  # a header for every table holding values, or empty
        lines.extend(["", "[" + ".".join(_key(k) for k in path) + "]"])
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in tables.items():
        _table(value, (*path, key), lines)


def _key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"TOML keys are strings, got {key!r}")
    return key if _BARE_KEY.match(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else str(value)  # nan, inf, -inf
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if value is None:
        raise TypeError("TOML has no null; leave the key out")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"  # inside an array
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _string(text: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # other control characters are not allowed raw
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


# ---------------------------------------------------------------------------------------------- model card
def model_card(out: Path, *, config: dict[str, Any], spec: dict[str, Any], info: dict[str, Any]) -> str:
    """README.md of a packed folder: what the model is, how it was made and how to use it."""
    model, data, solver = config.get("model", {}), config.get("data", {}), config.get("solver", {})
    options, latent = spec.get("options", {}), spec.get("latent")
    classes = spec.get("class_names") or []
    size, channels = options.get("input_size", "?"), options.get("in_channels", "?")
    where = str(out)
    if spec.get("denoiser") == "fpdm":
        body = (
            f"{options.get('pre_depth', '?')} pre block(s), one fixed-point block iterated "
            f"({solver.get('name', '?')}, {solver.get('max_iter', '?')} iterations), "
            f"{options.get('post_depth', '?')} post block(s)"
        )
    else:
        body = f"{options.get('depth', '?')} blocks"
    shape = f"{channels}x{size}x{size}"
    samples = (
        f"{shape} SD-VAE latents (scale {latent.get('scale_factor')}), decoded by an AutoencoderKL"
        if latent
        else f"{shape} images in [-1, 1]"
    )
    steps = f"{config.get('train', {}).get('steps', '?')} steps configured, weights of step {info.get('step', '?')}"
    diffusion = config.get("diffusion", {})
    first = repr(classes[0]) if classes else None
    call = f"n=16{', classes=[' + first + ']' if first else ''}, seed=0"
    vae = ', vae="path/to/vae"' if latent else ""
    rows = [
        (
            "architecture",
            f"{model.get('arch', '?')}: hidden {options.get('hidden_size', '?')}, "
            f"{options.get('num_heads', '?')} heads, patch {options.get('patch_size', '?')}; {body}",
        ),
        ("parameters", f"{info['parameters']:,}"),
        ("samples", samples),
        ("classes", ", ".join(classes) if classes else "unconditional"),
        (
            "training",
            f"{data.get('name', '?')} data, {steps}; {diffusion.get('schedule', '?')} schedule, "
            f"{diffusion.get('num_train_timesteps', '?')} timesteps, {diffusion.get('prediction', '?')} "
            "prediction",
        ),
        ("weights", f"{'EMA' if info['weights'] == 'ema' else 'raw (not EMA)'}, stored as {info['dtype']}"),
        ("made with", f"`{info['command']}` (fpdm {info['fpdm_version']})"),
    ]
    table = "\n".join(f"| {name} | {text} |" for name, text in rows)
    return f"""# {Path(where).name}

A Fixed Point Diffusion Model (Bai & Melas-Kyriazi, CVPR 2024) packed by fpdm.

| | |
|---|---|
{table}

## Use

```python
import fpdm
pipe = fpdm.load("{where}")
pipe.sample({call}, output_type="pil"{vae}).images[0].save("sample.png")
```

```bash
fpdm sample {where} --n 16{" --vae path/to/vae" if latent else ""}
```

## Files

`{WEIGHTS_NAME}` holds the weights; `{CONFIG_NAME}` the training config, the model spec and the sha256 of every
other file, which `fpdm.load` verifies. There is no optimizer state: resume training from the run folder.
"""
