"""The Python API: `load` a run, checkpoint or packed folder into a `Pipeline`, then `sample`, `save_pretrained`
and `export` it.

    import fpdm
    pipe = fpdm.load("runs/demo")
    pipe.sample(n=16, classes=["Sneaker"], seed=0, output_type="pil").images[0].save("sneaker.png")

`fpdm sample`, `fpdm pack`, `fpdm export` and `fpdm eval` parse their flags into the same option objects
(`SampleConfig`, `ExportConfig`) and call these functions: the CLI is a layer over this module, nothing more.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import Tensor

from fpdm.build import load_denoiser, resolve_device
from fpdm.config import Config, ExportConfig, SampleConfig, from_dict, make_config, to_dict
from fpdm.data.images import to_pil, to_uint8
from fpdm.diffusion.plan import base_diffusion, generate_planned, sampling_parts
from fpdm.diffusion.planner import plan_location, use_stored_plan
from fpdm.diffusion.sampling import StepStats
from fpdm.errors import UsageError
from fpdm.exporting import export_report
from fpdm.interfaces import Denoiser, Solver
from fpdm.io.checkpoint import Checkpoint, list_checkpoints, load_checkpoint
from fpdm.io.packed import DTYPES, is_packed, read_packed, write_packed
from fpdm.io.vae_weights import latent_decoder
from fpdm.registry import Registry, default_registry
from fpdm.version import __version__

if TYPE_CHECKING:
    from fpdm.models.vae import AutoencoderKL

WEIGHTS = ("ema", "raw")
MODEL_FOLDERS = (
    "a run folder (checkpoints/step-*/meta.json), a checkpoint folder (meta.json + model.safetensors + "
    "config.json + model.json) or a packed folder (config.toml + model.safetensors)"
)
_DTYPE_NAMES = {**DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """images: float32 CPU (N, C, H, W) in [-1, 1] ("tensor"; a latent model's raw samples for "latent"), a list
    of PIL images ("pil") or uint8 (N, H, W, C) ("numpy"). labels: (N,) class ids or None. blocks: (N,) block
    evaluations each image cost. stats: one dict per model evaluation (iterations, residuals, blocks, aggregated
    over the batches). plan: the resolved choices (sampler, solver, allocator, reuse, iterations and tolerance
    per step, device) for reports."""

    images: Any
    labels: Tensor | None
    blocks: Tensor
    stats: list[dict[str, float]]
    seconds: float
    plan: dict[str, Any]


def load(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = None,
    weights: str = "ema",
    registry: Registry | None = None,
) -> Pipeline:
    """A `Pipeline` from a run folder (its newest complete checkpoint), a checkpoint folder or a packed folder,
    verified against its hashes. `dtype` is the compute dtype (default float32, whatever the stored weights);
    `weights` "ema" (default) or "raw". Only resuming training needs optimizer state: none is read here."""
    if weights not in WEIGHTS:
        raise UsageError(f"weights must be 'ema' or 'raw', got {weights!r}")
    registry = registry or default_registry()
    root = Path(path).expanduser()
    if is_packed(root):
        packed = read_packed(root)
        held = packed.info.get("weights")
        if held != weights:
            raise UsageError(f"{root} holds the {held} weights only; load it with weights={held!r} (--weights {held})")
        step = packed.info.get("step")
        ckpt = Checkpoint(
            root, step if isinstance(step, int) else -1, packed.config, packed.spec, packed.weights, packed.weights
        )
        kind = "packed"
    else:
        ckpt, kind = load_checkpoint(_checkpoint_folder(root)), "checkpoint"
    config = from_dict(Config, ckpt.config)
    denoiser = load_denoiser(ckpt, ema=weights == "ema", registry=registry)
    pipe = Pipeline(
        denoiser,
        config,
        ckpt.spec,
        registry=registry,
        path=ckpt.path,
        step=ckpt.step if ckpt.step >= 0 else None,
        weights=weights,
        kind=kind,
    )
    return pipe.to(device=device, dtype=dtype or torch.float32)


def _checkpoint_folder(root: Path) -> Path:
    if root.suffix == ".onnx":
        raise UsageError(
            f"{root} is an exported ONNX graph: sample it with `fpdm sample {root}` (ONNX Runtime); "
            f"fpdm.load reads {MODEL_FOLDERS}"
        )
    if not root.exists():
        raise UsageError(f"model not found: {root} (expected {MODEL_FOLDERS})")
    if (root / "meta.json").is_file() or list_checkpoints(root / "checkpoints") or list_checkpoints(root):
        return root
    raise UsageError(f"{root} is not a model folder: expected {MODEL_FOLDERS}")


class Pipeline:
    """A loaded model ready to sample: `denoiser` (eval mode), `diffusion` (the training GaussianDiffusion),
    `config` (the run's `fpdm.config.Config`), `spec` (how the denoiser is rebuilt) and `class_names`.

    Holds no sampling state between calls: every `sample` plans and runs its loop afresh."""

    def __init__(
        self,
        denoiser: Denoiser,
        config: Config,
        spec: dict[str, Any],
        *,
        registry: Registry | None = None,
        path: Path | None = None,
        step: int | None = None,
        weights: str = "ema",
        kind: str = "memory",
    ) -> None:
        self.denoiser = denoiser
        self.config = config
        self.spec = spec
        self.registry = registry or default_registry()
        self.diffusion = base_diffusion(config, self.registry)
        self.class_names: list[str] = list(spec.get("class_names", []))
        self.path, self.step, self.weights, self.kind = path, step, weights, kind  # where it came from

    def __repr__(self) -> str:
        where = f" from {self.path}" if self.path else ""
        return f"Pipeline({self.config.model.arch}{where}, {self.weights} weights, {self.device}, {self.dtype})"

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def is_latent(self) -> bool:
        """Whether the model samples VAE latents (decoded to images through a VAE) rather than pixels."""
        return self.spec.get("latent") is not None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> Pipeline:
        """Move the denoiser ("auto", "cpu", "cuda", "cuda:N" or a torch.device; a dtype or "fp32"/"bf16"/"fp16").
        Returns self."""
        moved = None if device is None else resolve_device(str(device))
        cast = None if dtype is None else _dtype(dtype)
        self.denoiser.to(device=moved, dtype=cast)
        return self

    def output_dir(self, name: str) -> Path:
        """Where a command writes `name` (samples, export) by default: RUN/name for a run's checkpoint, a sibling
        DIR-name of a packed folder (which stays as it was packed)."""
        if self.path is None:
            raise UsageError(f"this pipeline was not loaded from a folder: give the {name} path (--out)")
        if self.kind == "packed":
            return self.path.parent / f"{self.path.name}-{name}"
        run = self.path.parent.parent if self.path.parent.name == "checkpoints" else self.path.parent
        return run / name

    def sample(
        self,
        config: SampleConfig | None = None,
        *,
        n: int = 64,
        classes: int | str | Sequence[int | str] | None = None,
        steps: int = 50,
        spacing: str | None = None,
        budget: int | str | None = None,
        sampler: str | object = "ddpm",
        solver: str | object | None = None,
        allocator: str | object = "uniform",
        reuse: str | object = "reuse",
        iters: int | None = None,
        tol: float = 0.0,
        cfg_scale: float = 1.0,
        cfg_channels: int | None = None,
        guidance_rescale: float = 0.0,
        clip_x0: bool = False,
        eta: float | None = None,
        batch_size: int = 64,
        seed: int = 0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: Tensor | None = None,
        callback: Callable[[StepStats], None] | None = None,
        progress: bool = False,
        output_type: str = "tensor",
        vae: str | Path | AutoencoderKL | None = None,
        plan: str | Path | bool = True,
    ) -> SampleOutput:
        """`n` samples; the options are `SampleConfig`'s (see it). With `config`, each keyword that differs from
        its default overrides the config's value. `generator` (one torch.Generator, or one per image) replaces
        `seed`; `latents` (n, C, H, W) is x_T given directly; `callback(StepStats)` sees every model evaluation;
        `vae` (a diffusers AutoencoderKL folder or a loaded one) decodes a latent model's samples. `plan`: with
        a `budget`, the settings `fpdm plan` stored for it (True: the model's own plan, a path: that plan file,
        False: none; see `fpdm.diffusion.planner`)."""
        given = {key: value for key, value in locals().items() if key in _SAMPLE_FIELDS}
        options = _merged(config, given)
        return run_sample(self, options, generator=generator, latents=latents, callback=callback, vae=vae, plan=plan)

    def save_pretrained(
        self, out: str | Path, *, dtype: str = "fp32", weights: str = "ema", command: str | None = None
    ) -> Path:
        """Write a packed folder (model.safetensors in `dtype`, config.toml with hashes, README.md model card)
        atomically; the same as `fpdm pack RUN --out DIR`. `command` is what the card says made it."""
        if weights not in WEIGHTS:
            raise UsageError(f"weights must be 'ema' or 'raw', got {weights!r}")
        if weights == self.weights:
            state = self.denoiser.state_dict()
        elif self.kind == "checkpoint" and self.path is not None:  # the other set is in the checkpoint
            ckpt = load_checkpoint(self.path)
            state = ckpt.ema if weights == "ema" else ckpt.model
        else:
            raise UsageError(
                f"this pipeline holds the {self.weights} weights only; save it with weights={self.weights!r}"
            )
        parameters = sum(p.numel() for p in self.denoiser.parameters())
        made = command or f'pipe.save_pretrained("{out}", dtype="{dtype}", weights="{weights}")'
        return write_packed(
            out,
            state=state,
            config=to_dict(self.config),
            spec=self.spec,
            step=self.step,
            weights=weights,
            dtype=dtype,
            parameters=parameters,
            command=made,
            fpdm_version=__version__,
        )

    def export(self, config: ExportConfig | None = None) -> Path:
        """Export through the registered exporter `config.format` (fpdm.export's "onnx" by default); the path
        written. `fpdm export` runs the same `export_report`."""
        return Path(export_report(self, config or ExportConfig())["path"])


_SAMPLE_FIELDS = frozenset(f.name for f in attrs.fields(SampleConfig))


def _merged(config: SampleConfig | None, given: dict[str, Any]) -> SampleConfig:
    if config is None:
        return make_config(SampleConfig, **given)
    defaults = SampleConfig()
    changed = {k: v for k, v in given.items() if not _same(v, getattr(defaults, k))}
    return make_config(SampleConfig, **{**attrs.asdict(config, recurse=False), **changed})


def _same(value: Any, default: Any) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}; use {', '.join(_DTYPE_NAMES)} or a torch.dtype")
    return _DTYPE_NAMES[dtype]


# ---------------------------------------------------------------------------------------------- sampling
def run_sample(
    pipe: Pipeline,
    options: SampleConfig,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    latents: Tensor | None = None,
    callback: Callable[[StepStats], None] | None = None,
    vae: str | Path | AutoencoderKL | None = None,
    plan: str | Path | bool = True,
) -> SampleOutput:
    """`Pipeline.sample` with its options resolved: checks first (stored plan, classes, VAE, plan), then the loop."""
    options, stored = _stored_plan(pipe, options, plan)
    model = pipe.denoiser
    shape = (model.in_channels, model.input_size, model.input_size)
    labels = class_ids(options.classes, pipe.class_names, model.num_classes)
    decode = _decoder(pipe, options.output_type, vae)
    iters = pipe.config.solver.max_iter if options.iters is None else options.iters
    parts = sampling_parts(pipe.config, model, options, registry=pipe.registry, iters=iters)
    solver, solver_name = _solver(pipe, options.solver)
    generators = _generators(generator, options.n)
    x_T = _start(latents, options.n, shape)
    from tqdm.auto import tqdm

    # A bf16/fp16 denoiser runs under autocast: the loop's state (x, noise) stays float32, each op gets the dtype
    # autocast picks for it (matmuls and convs in half precision, norms in float32).
    half = torch.autocast(pipe.device.type, dtype=pipe.dtype, enabled=pipe.dtype != torch.float32)
    with tqdm(total=options.n, unit="img", disable=not options.progress) as bar, half:
        result = generate_planned(
            model,
            parts,
            options,
            labels=labels,
            solver=solver,
            device=pipe.device,
            clip_output=not pipe.is_latent,
            progress=bar.update,
            callback=callback,
            generators=generators,
            x_T=x_T,
        )
    images = result.images.float()
    if decode is not None:  # latents -> images in [-1, 1]
        images = decode(images)
    report = {
        **parts.names,
        "solver": solver_name,
        "iterations": parts.iterations,
        "tol": parts.tolerances,
        "device": str(pipe.device),
        "stored_plan": None if stored is None else stored["file"],
    }
    return SampleOutput(
        convert(images, options.output_type), result.labels, result.blocks, result.steps, result.seconds, report
    )


def _stored_plan(pipe: Pipeline, options: SampleConfig, plan: str | Path | bool) -> tuple[SampleConfig, Any]:
    """`options` with the stored plan for its budget applied (`fpdm.diffusion.planner`), notes on stderr."""
    if plan is False or options.budget is None or (plan is True and pipe.path is None):
        return options, None
    location = plan_location(pipe.path, pipe.kind, pipe.weights, file=None if plan is True else plan)
    if plan is not True and not location.file.is_file():
        raise UsageError(f"plan file not found: {location.file}")
    return use_stored_plan(options, location, say=lambda line: print(line, file=sys.stderr, flush=True))


def class_ids(classes: Sequence[int | str] | None, names: Sequence[str], num_classes: int) -> list[int] | None:
    """Class ids from ids or class names (None: every class in turn); None for an unconditional model."""
    if not num_classes:
        if classes:
            raise UsageError("this model is unconditional: classes do not apply")
        return None
    if not classes:
        return list(range(num_classes))
    listing = f" ({', '.join(names)})" if names else ""
    ids = []
    for c in classes:
        if isinstance(c, str):
            folded = [name.casefold() for name in names]
            if c in names or folded.count(c.casefold()) == 1:
                ids.append(names.index(c) if c in names else folded.index(c.casefold()))
                continue
            raise UsageError(
                f"invalid class {c!r}: not a class name of this model{listing} nor an id 0..{num_classes - 1}"
            )
        if not 0 <= c < num_classes:
            raise UsageError(f"class id {c} out of range: the model has classes 0..{num_classes - 1}{listing}")
        ids.append(c)
    return ids


def _decoder(pipe: Pipeline, output_type: str, vae: Any) -> Callable[[Tensor], Tensor] | None:
    """None when the samples are the output as they are, else latents -> images through the VAE."""
    model = pipe.denoiser
    if output_type == "latent":
        if not pipe.is_latent:
            raise UsageError("output_type 'latent' applies to latent models; this model samples pixels ('tensor')")
        if vae is not None:
            raise UsageError("output_type 'latent' returns the latents undecoded: drop vae, or ask for 'tensor'")
        return None
    if vae is not None and not isinstance(vae, (str, Path)):
        return _vae_decoder(pipe, vae)
    if vae is None and pipe.is_latent:
        vae = pipe.spec["latent"].get("vae")  # a VAE folder the run recorded, if any
    return latent_decoder(
        pipe.spec,
        None if vae is None else str(vae),
        in_channels=model.in_channels,
        input_size=model.input_size,
        device=pipe.device,
    )


def _vae_decoder(pipe: Pipeline, vae: AutoencoderKL) -> Callable[[Tensor], Tensor]:
    channels = pipe.denoiser.in_channels
    if not pipe.is_latent:
        raise UsageError("vae applies to latent models only; this model generates images directly")
    if getattr(getattr(vae, "config", None), "latent_channels", None) != channels:
        raise UsageError(
            f"the VAE has {getattr(getattr(vae, 'config', None), 'latent_channels', '?')} latent "
            f"channels; this model generates {channels}"
        )
    scale = float(pipe.spec["latent"]["scale_factor"])
    device = next(vae.parameters()).device

    def decode(latents: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat(
                [vae.decode_latents(chunk.to(device), scale_factor=scale).float().cpu() for chunk in latents.split(16)]
            )  # (N, C, H*f, W*f)

    return decode


def _solver(pipe: Pipeline, choice: str | object | None) -> tuple[Solver, str]:
    configured = pipe.config.solver
    if choice is None:
        return pipe.registry.create("solver", configured.name, **configured.options), configured.name
    if isinstance(choice, str):
        return pipe.registry.create("solver", choice), choice
    if not isinstance(choice, Solver):
        raise UsageError(f"solver must be a registered name or an fpdm.Solver, got {type(choice).__name__}")
    return choice, type(choice).__name__


def _generators(generator: Any, n: int) -> list[torch.Generator] | None:
    """One CPU generator per image: a list as given, or seeds drawn from one generator (so the images still do
    not depend on the batch size)."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        seeds = torch.randint(0, 2**62, (n,), generator=generator, device=generator.device).tolist()
        return [torch.Generator().manual_seed(s) for s in seeds]
    gens = list(generator)
    if len(gens) != n or not all(isinstance(g, torch.Generator) and g.device.type == "cpu" for g in gens):
        raise UsageError(f"generator must be a torch.Generator or a list of n={n} CPU generators")
    return gens


def _start(latents: Tensor | None, n: int, shape: tuple[int, ...]) -> Tensor | None:
    if latents is None:
        return None
    if not isinstance(latents, Tensor) or tuple(latents.shape) != (n, *shape):
        got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise UsageError(f"latents must be a tensor of shape (n, C, H, W) = {(n, *shape)}, got {got}")
    if not latents.is_floating_point() or not bool(torch.isfinite(latents).all()):
        raise UsageError("latents must be finite floating-point values")
    return latents.float()


def convert(images: Tensor, output_type: str) -> Any:
    if output_type == "pil":
        return to_pil(images)
    if output_type == "numpy":
        return to_uint8(images).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    return images
