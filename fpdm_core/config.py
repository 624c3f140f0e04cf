"""Configuration: frozen, grouped, strict. TOML file + `--set a.b=v` overrides -> `Config`.

Unknown keys, wrong types and out-of-range values are `UsageError`s that name the key. Every checkpoint and
export stores `to_dict(config)` so it can be rebuilt with `from_dict`.
"""

from __future__ import annotations

import copy
import math
import operator
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import attrs
from attrs import validators as v

from fpdm.budget import budget_value
from fpdm.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def finite(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator shared by every float field of every config: NaN and +-inf are refused (None passes, for
    optional fields), so the API and `--set a.b=nan` fail alike, naming the field."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"'{attribute.name}' must be a finite number, got {value!r}")


def at_least(lo: int) -> Any:
    """attrs validator: an integer (not a bool) >= lo; the message names the field as the API and CLI spell it."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attribute.name} must be an integer, got {type(value).__name__} ({value!r})")
        if value < lo:
            raise ValueError(f"{attribute.name} must be >= {lo}, got {value}")

    return check


@attrs.frozen
class DataConfig:
    """What to train on. `path`: the IDX folder for fashion_mnist (default: the Debian package's folder), the
    root folder for image_folder or latents (required). `split` only applies to fashion_mnist.

    For `latents` (pre-encoded SD-VAE latents in the official DiT/FPDM feature format, see fpdm.latents)
    `image_size` is the latent spatial size H (32 for 256 px images), `channels` the latent channels (4), and
    `scale_factor` the VAE scaling the stored latents already carry (recorded in the checkpoint)."""

    name: str = attrs.field(default="fashion_mnist", validator=v.in_(("fashion_mnist", "image_folder", "latents")))
    path: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))
    split: str = attrs.field(default="train", validator=v.in_(("train", "test")))
    image_size: int = attrs.field(default=32, validator=[v.instance_of(int), v.ge(8)])
    channels: int = attrs.field(default=1, validator=[v.instance_of(int), v.in_((1, 3, 4))])
    class_conditional: bool = attrs.field(default=True, validator=v.instance_of(bool))
    random_flip: bool = attrs.field(default=False, validator=v.instance_of(bool))
    scale_factor: float = attrs.field(default=0.18215, validator=[v.gt(0.0), finite])


@attrs.frozen
class SolverConfig:
    """Which solver finds the fixed point and how hard it tries. `options` go to the solver's factory.
    Training draws its iteration count per step from `train.no_grad_iters`; `max_iter` serves solving
    and sampling."""

    name: str = "fixed_point"
    max_iter: int = attrs.field(default=12, validator=v.ge(0))
    tol: float = attrs.field(default=0.0, validator=[v.ge(0.0), finite])
    check_every: int = attrs.field(default=1, validator=v.ge(1))
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ModelConfig:
    """The denoiser. `arch` is FAMILY-SIZE/PATCH (FPDM-XL/2, DiT-S/4, ...); FAMILY is a registered denoiser.
    hidden_size / num_heads / depth override the named size; input size, channels and classes come from data."""

    arch: str = "FPDM-XS/4"
    hidden_size: int | None = attrs.field(default=None, validator=v.optional(v.ge(4)))
    num_heads: int | None = attrs.field(default=None, validator=v.optional(v.ge(1)))
    depth: int | None = attrs.field(default=None, validator=v.optional(v.ge(1)))  # DiT blocks
    pre_depth: int = attrs.field(default=1, validator=v.ge(0))
    post_depth: int = attrs.field(default=1, validator=v.ge(0))
    mlp_ratio: float = attrs.field(default=4.0, validator=[v.gt(0.0), finite])
    learn_sigma: bool = True
    prepost_timestep: bool = False  # official default: pre/post blocks see the class only
    options: dict[str, Any] = attrs.field(factory=dict)  # extra options of a third-party denoiser


@attrs.frozen
class DiffusionConfig:
    schedule: str = "linear"  # a registered schedule
    num_train_timesteps: int = attrs.field(default=1000, validator=v.ge(1))
    prediction: str = attrs.field(default="eps", validator=v.in_(("eps", "v")))
    zero_terminal_snr: bool = False
    options: dict[str, Any] = attrs.field(factory=dict)  # schedule options, e.g. beta_start, beta_end


def _range(lo: int) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: list[int]) -> None:
        if len(value) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise ValueError(f"'{attribute.name}' must be two integers [min, max], got {value!r}")
        if value[0] < lo or value[0] > value[1]:
            raise ValueError(f"'{attribute.name}' must satisfy {lo} <= min <= max, got {value!r}")

    return check


@attrs.frozen
class TrainConfig:
    """The training loop. S-JFB draws n_no_grad ~ U[no_grad_iters] and n_grad ~ U[grad_iters] each step.

    Each optimizer step takes `batch_size` samples (the GLOBAL batch: torchrun ranks split it evenly) in
    `grad_accum` equal micro-batches. The learning rate warms up linearly over `warmup_steps`, then follows
    `lr_schedule` ("constant"; "cosine" or "linear" decay to lr * min_lr_ratio at `steps`). `min_snr_gamma` > 0
    weights the mse term by Min-SNR-gamma (Hang et al. 2023); `tensorboard` adds RUN/tb/ event files."""

    steps: int = attrs.field(default=2000, validator=v.ge(1))
    batch_size: int = attrs.field(default=64, validator=v.ge(1))
    grad_accum: int = attrs.field(default=1, validator=at_least(1))  # micro-batches per optimizer step
    lr: float = attrs.field(default=1e-4, validator=[v.gt(0.0), finite])
    lr_schedule: str = attrs.field(default="constant", validator=v.in_(("constant", "cosine", "linear")))
    warmup_steps: int = attrs.field(default=0, validator=at_least(0))
    min_lr_ratio: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.le(1.0), finite])  # the decay's floor
    weight_decay: float = attrs.field(default=0.0, validator=[v.ge(0.0), finite])
    grad_clip: float = attrs.field(default=0.0, validator=[v.ge(0.0), finite])  # 0 = off
    skip_nonfinite: int = attrs.field(default=0, validator=v.ge(0))  # batches with NaN/inf to skip before stopping
    ema_decay: float = attrs.field(default=0.9999, validator=[v.ge(0.0), v.lt(1.0), finite])
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)): short runs get a useful EMA
    label_dropout: float = attrs.field(default=0.1, validator=[v.ge(0.0), v.lt(1.0), finite])
    min_snr_gamma: float = attrs.field(default=0.0, validator=[v.ge(0.0), finite])  # 0 = unweighted mse
    no_grad_iters: list[int] = attrs.field(factory=lambda: [0, 10], validator=_range(0))
    grad_iters: list[int] = attrs.field(factory=lambda: [1, 12], validator=_range(0))
    # > 0: the no-grad solve may stop early
    no_grad_tol: float = attrs.field(default=0.0, validator=[v.ge(0.0), finite])
    checkpoint_activations: bool = False  # gradient checkpointing per block and per grad-phase iteration
    precision: str = attrs.field(default="auto", validator=v.in_(("auto", "fp32", "bf16")))  # auto: bf16 on CUDA
    tf32: bool = True
    compile: bool = False
    device: str = "auto"
    seed: int = attrs.field(default=0, validator=v.ge(0))
    log_every: int = attrs.field(default=50, validator=v.ge(1))
    tensorboard: bool = attrs.field(default=False, validator=v.instance_of(bool))  # RUN/tb/ besides metrics.jsonl
    ckpt_every: int = attrs.field(default=500, validator=v.ge(1))
    keep_checkpoints: int = attrs.field(default=2, validator=v.ge(1))
    out_dir: str = "runs/fashion_mnist"

    def __attrs_post_init__(self) -> None:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size={self.batch_size} does not split into grad_accum={self.grad_accum} equal micro-batches"
            )


@attrs.frozen
class Config:
    model: ModelConfig = attrs.field(factory=ModelConfig)
    diffusion: DiffusionConfig = attrs.field(factory=DiffusionConfig)
    data: DataConfig = attrs.field(factory=DataConfig)
    solver: SolverConfig = attrs.field(factory=SolverConfig)
    train: TrainConfig = attrs.field(factory=TrainConfig)


@attrs.frozen
class EvalConfig:
    """How `fpdm.evaluate` / `fpdm eval` compares samples with a reference (FID, KID, precision/recall).

    `ref`: "fashion_mnist" (its `ref_split`, from `data_dir`) or a folder of images; `ref_n` keeps a seeded
    random subset. `extractor`: "auto" (fpdm's Fashion-MNIST CNN for Fashion-MNIST and gray images,
    Inception-v3 otherwise), "fpdm-fmnist-cnn", "inception-v3" (local `inception_weights` only) or the path of
    a CNN extractor file; the shipped CNN is used unless `cache` names a folder holding a retrained one
    (`fpdm eval --train-extractor`). When the samples are a model,
    `n` images are drawn (required then), `batch_size` at a time, from its `weights` on `device` (`n`,
    `batch_size` and `seed` win over a SampleConfig's). `seed` also seeds the reference subset and KID."""

    ref: str = attrs.field(default="fashion_mnist", validator=v.instance_of(str))
    ref_split: str = attrs.field(default="test", validator=v.in_(("test", "train")))
    ref_n: int | None = attrs.field(default=None, validator=v.optional(at_least(1)))
    data_dir: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))
    extractor: str = attrs.field(default="auto", validator=v.instance_of(str))
    inception_weights: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))
    cache: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))
    prc: bool = attrs.field(default=True, validator=v.instance_of(bool))
    kid_subset_size: int = attrs.field(default=1000, validator=at_least(1))
    n: int | None = attrs.field(default=None, validator=v.optional(at_least(1)))
    batch_size: int = attrs.field(default=64, validator=at_least(1))
    seed: int = attrs.field(default=0, validator=at_least(0))
    device: str = attrs.field(default="auto", validator=v.instance_of(str))
    weights: str = attrs.field(default="ema", validator=v.in_(("ema", "raw")))


def _classes(value: Any) -> tuple[int | str, ...] | None:
    """One class or several, as ids or names -> a tuple (None or empty: every class in turn)."""
    if value is None:
        return None
    items = [value] if isinstance(value, (int, str)) else list(value)
    out: list[int | str] = []
    for item in items:
        if isinstance(item, bool):
            raise TypeError(f"classes holds {item!r}; give class ids or class names")
        out.append(item if isinstance(item, str) else operator.index(item))  # numpy / 0-d tensor ids too
    return tuple(out) or None


def _path(value: Any) -> str | None:
    return None if value is None else str(value)


@attrs.frozen
class SampleConfig:
    """What `Pipeline.sample` and `fpdm sample` do: `n` images in batches of `batch_size`, `steps` respaced
    steps of `sampler` placed by `spacing` (`fpdm.spacing.SPACINGS`; "official" is guided-diffusion's rule; None:
    the sampler's own default, official for ddpm and ddim, trailing for the others),
    the fixed-point solve (`solver`, `iters` per step, or a `budget` in block evaluations (60) or DiT-step
    equivalents ("10dit", `fpdm.budget`) spread by `allocator`; `reuse` warm-starts each step), guidance and
    the output form.

    `guidance_rescale`: Lin et al. 2023's phi in [0, 1] (0: plain guidance).
    `classes`: ids or the run's class names, cycled over the n images (None: every class in turn).
    `sampler` / `solver` / `allocator` / `reuse`: a registered name or an instance (`solver` None: the model's
    configured solver; `iters` None: its solver.max_iter). `seed` gives image k the generator (seed, k), so
    images do not depend on the batch size. `output_type`: "tensor" (float32 CPU in [-1, 1]), "pil", "numpy"
    (uint8 (N, H, W, C)) or "latent" (a latent model's raw samples)."""

    n: int = attrs.field(default=64, validator=at_least(1))
    classes: tuple[int | str, ...] | None = attrs.field(default=None, converter=_classes)
    steps: int = attrs.field(default=50, validator=at_least(1))
    spacing: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))
    budget: int | str | None = attrs.field(default=None, converter=budget_value)  # blocks, or "10dit"
    sampler: str | object = "ddpm"
    solver: str | object | None = None
    allocator: str | object = "uniform"
    reuse: str | object = "reuse"
    iters: int | None = attrs.field(default=None, validator=v.optional(at_least(0)))
    tol: float = attrs.field(default=0.0, validator=[v.instance_of((int, float)), v.ge(0.0), finite])
    cfg_scale: float = attrs.field(default=1.0, validator=[v.instance_of((int, float)), finite])
    cfg_channels: int | None = attrs.field(default=None, validator=v.optional(at_least(1)))
    guidance_rescale: float = attrs.field(
        default=0.0, validator=[v.instance_of((int, float)), v.ge(0.0), v.le(1.0), finite]
    )
    clip_x0: bool = attrs.field(default=False, validator=v.instance_of(bool))
    eta: float | None = attrs.field(default=None, validator=v.optional([v.instance_of((int, float)), finite]))
    batch_size: int = attrs.field(default=64, validator=at_least(1))
    seed: int = attrs.field(default=0, validator=at_least(0))
    progress: bool = attrs.field(default=False, validator=v.instance_of(bool))
    output_type: str = attrs.field(default="tensor", validator=v.in_(("tensor", "pil", "numpy", "latent")))


@attrs.frozen
class ExportConfig:
    """What `Pipeline.export` and `fpdm export` write: a registered exporter (`format`) run on one denoising
    step with the solver unrolled `iters` times (None: the model's solver.max_iter), or with `whole_loop` all
    `steps` sampling steps in one graph, the sampling choices (budget, sampler, allocator, reuse, guidance)
    baked in. `out` None: RUN/export/<checkpoint>-k<K>.onnx (a packed folder: DIR/export/)."""

    format: str = "onnx"
    iters: int | None = attrs.field(default=None, validator=v.optional(at_least(1)))
    solver: str | None = None
    opset: int | None = attrs.field(default=None, validator=v.optional(at_least(1)))
    fp16: bool = attrs.field(default=False, validator=v.instance_of(bool))
    verify: bool = attrs.field(default=True, validator=v.instance_of(bool))
    out: str | None = attrs.field(default=None, converter=_path)
    whole_loop: bool = attrs.field(default=False, validator=v.instance_of(bool))
    steps: int | None = attrs.field(default=None, validator=v.optional(at_least(1)))
    spacing: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))
    budget: int | str | None = attrs.field(default=None, converter=budget_value)  # blocks, or "10dit"
    sampler: str = "ddpm"
    eta: float | None = attrs.field(default=None, validator=v.optional([v.instance_of((int, float)), finite]))
    allocator: str = "uniform"
    reuse: str = "reuse"
    cfg_scale: float = attrs.field(default=1.0, validator=[v.instance_of((int, float)), finite])
    cfg_channels: int | None = attrs.field(default=None, validator=v.optional(at_least(1)))
    guidance_rescale: float = attrs.field(
        default=0.0, validator=[v.instance_of((int, float)), v.ge(0.0), v.le(1.0), finite]
    )
    clip_x0: bool = attrs.field(default=False, validator=v.instance_of(bool))

    def __attrs_post_init__(self) -> None:
        if self.whole_loop and self.steps is None:
            raise ValueError("whole_loop needs steps (the sampling steps the graph runs)")
        if not self.whole_loop and (self.steps is not None or self.budget is not None):
            raise ValueError("steps and budget only apply to whole_loop; a step graph runs iters per call")


def make_config(cls: type[T], **values: Any) -> T:
    """`cls(**values)` with a bad value turned into one UsageError line (what the CLI prints, exit 2)."""
    try:
        return cls(**values)
    except UsageError:
        raise
    except (TypeError, ValueError) as exc:
        raise UsageError(_construction_error(cls, values, exc, path="")) from None


def _construction_error(cls: type, values: dict[str, Any], exc: Exception, *, path: str) -> str:
    """One line for `cls(**values)` failing with `exc`: the field (as `path` + name), its value and what is
    allowed. attrs' own validators do not say which field of several failed, so each given field's converter
    and validator runs again, in attrs' order; no field failing alone means a cross-field check failed."""
    for field in attrs.fields(cls):
        if field.name not in values:
            continue
        value = values[field.name]
        try:
            converted = field.converter(value) if callable(field.converter) else value
            if field.validator is not None:
                field.validator(None, field, converted)
        except (TypeError, ValueError) as bad:
            return _field_message(f"{path}{field.name}", field.name, value, bad)
    where = f"[{path.rstrip('.')}] " if path else ""
    return where + _first_line(exc)


def _field_message(key: str, name: str, value: Any, exc: Exception) -> str:
    """attrs' in_ and instance_of errors carry (message, attribute, allowed, value): spelled out here, where
    str(exc) would print that tuple. Other validators' messages name the field; `key` is prefixed when it says
    more than the bare name (train.lr vs lr)."""
    args = exc.args
    if len(args) >= 4 and isinstance(args[1], attrs.Attribute):
        allowed = args[2]
        if isinstance(exc, TypeError):  # instance_of: allowed is a type or a tuple of types
            types_ = allowed if isinstance(allowed, tuple) else (allowed,)
            names = " or ".join(getattr(t, "__name__", str(t)) for t in types_)
            return f"{key} must be {names}, got {type(value).__name__} ({value!r})"
        return f"{key}: {value!r} is not one of {', '.join(str(option) for option in allowed)}"
    text = _first_line(exc)
    return text if key == name else f"{key}: {text}"


def _first_line(exc: Exception) -> str:
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def from_dict(cls: type[T], data: Any, *, path: str = "") -> T:
    """Build the attrs class `cls` from plain data, rejecting unknown keys and wrong types."""
    where = f"[{path.rstrip('.')}]" if path else "the config"
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in attrs.fields(cls)}  # type: ignore[arg-type]  # cls is an attrs class: a TypeVar mypy cannot narrow
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(f"unknown key '{path}{unknown[0]}'; known keys in {where}: {', '.join(fields)}")
    values = {name: _coerce(hints[name], data[name], f"{path}{name}") for name in data}
    try:
        return cls(**values)
    except UsageError:
        raise
    except (TypeError, ValueError) as exc:
        raise UsageError(_construction_error(cls, values, exc, path=path)) from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if attrs.has(hint):
        return from_dict(hint, value, path=f"{key}.")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(option, value, key)
            except UsageError:
                continue
        raise UsageError(f"{key} has the wrong type: {type(value).__name__} ({value!r}); expected {hint}")
    base = origin or hint
    if base is Any:
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (base in (int, float) and isinstance(value, bool)) or not isinstance(value, base):
        raise UsageError(f"{key} must be {base.__name__}, got {type(value).__name__} ({value!r})")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dicts (TOML/JSON-safe) of a config."""
    return attrs.asdict(config, recurse=True)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=v` -> (["a", "b"], v). The value is read as TOML (numbers, booleans, strings, arrays, inline
    tables); a bare word that is not valid TOML is taken as a string, so `--set solver.name=anderson` works."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set expects KEY=VALUE (e.g. solver.max_iter=8), got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return [part.strip() for part in key.split(".")], value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    defaults: tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Class defaults <- `base` (e.g. a run's saved config) <- `defaults` (a command's own, as KEY=VALUE)
    <- TOML file <- `overrides`, validated into a frozen `Config`."""
    data: dict[str, Any] = copy.deepcopy(base) if base else {}
    _apply_overrides(data, defaults)
    if path is not None:
        try:
            _merge(data, tomllib.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise UsageError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read config {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"bad TOML in {path}: {exc}") from None
    _apply_overrides(data, overrides)
    return from_dict(Config, data)


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for part in keys[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--set {item}: {part!r} is a value, not a table")
            node = child
        node[keys[-1]] = value
