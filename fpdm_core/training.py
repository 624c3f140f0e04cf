"""The training loop: S-JFB for FPDM (Bai & Melas-Kyriazi 2024, sec. 3.3), plain backprop for DiT.

Every random draw of a step (batch, timesteps, noise, label dropout, S-JFB iteration counts) comes from a
generator seeded by (seed, step), so a resumed run continues exactly where it stopped and every rank of a
distributed run draws the same iteration counts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .build import build_denoiser, build_schedule, build_solver, check_compatible, denoiser_options
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import Config, to_dict
from .data import build_dataset
from .diffusion import GaussianDiffusion
from .errors import FpdmRuntimeError, UsageError
from .interfaces import Solver
from .models import DiTBlock
from .registry import Registry

Logger = Callable[[dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    checkpoint: Path
    step: int
    history: list[dict[str, Any]]


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


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        e, m = list(ema.parameters()), list(model.parameters())
        torch._foreach_lerp_(e, m, 1.0 - decay)


class _Batches:
    """Batch b of epoch e is slice b of a permutation seeded by (seed, e): a pure function of the step."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < batch_size:
            raise UsageError(f"dataset has {n} images, fewer than train.batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.per_epoch = n, batch_size, seed, n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> Tensor:
        epoch, b = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm[b * self.batch_size : (b + 1) * self.batch_size]


def train(config: Config, *, resume: bool = False, registry: Registry | None = None, progress: bool = True,
          is_main: bool = True, log: Logger | None = None) -> TrainResult:
    """Train the configured model; checkpoints and metrics.jsonl go to `config.train.out_dir`."""
    tc = config.train
    device = resolve_device(tc.device)
    run_dir, started = Path(tc.out_dir), time.perf_counter()
    ckpt_root = run_dir / "checkpoints"
    if not resume and list_checkpoints(ckpt_root):
        raise UsageError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another --out")
    torch.manual_seed(tc.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tc.tf32

    dataset = build_dataset(config.data)
    images, labels = dataset.tensors()  # (N, C, H, W) in [-1, 1], (N,)
    family, options = denoiser_options(config.model, input_size=dataset.image_size, in_channels=dataset.channels,
                                       num_classes=dataset.num_classes)
    spec = {"denoiser": family, "options": options, "class_names": list(dataset.class_names)}
    if config.data.name == "latents":  # samples are latents: `fpdm sample --vae` decodes them with this scale
        spec["latent"] = {"scale_factor": float(config.data.scale_factor)}
    model = build_denoiser(config.model, input_size=dataset.image_size, in_channels=dataset.channels,
                           num_classes=dataset.num_classes, checkpoint=tc.checkpoint_activations, registry=registry)
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    diffusion = GaussianDiffusion(build_schedule(config.diffusion, registry), prediction=config.diffusion.prediction,
                                  learn_sigma=config.model.learn_sigma)
    solver = build_solver(config.solver, registry)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    config_dict, start = to_dict(config), 0
    if resume:
        ckpt = load_checkpoint(run_dir)
        check_compatible(ckpt.config, config_dict, ("model", "diffusion", "data"))
        model.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
        opt_state, trainer_state = ckpt.training_state()
        optimizer.load_state_dict(opt_state)
        torch.set_rng_state(trainer_state["torch_rng"])
        start = ckpt.step
        if start >= tc.steps:
            raise UsageError(f"{run_dir} is already at step {start} of train.steps={tc.steps}; raise train.steps to continue")
    if tc.compile:
        for module in model.modules():  # per block: one graph reused by every fixed-point iteration
            if isinstance(module, DiTBlock):
                module.compile()
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))

    batches = _Batches(len(images), tc.batch_size, tc.seed)
    num_classes = dataset.num_classes
    history: list[dict[str, Any]] = []
    window: dict[str, float] = {}
    last_ckpt = None
    bar = _progress(start, tc.steps, progress and is_main)
    tick, tick_step = time.perf_counter(), start
    for step in range(start, tc.steps):
        gen = torch.Generator(device=device).manual_seed(tc.seed * 1_000_003 + step)
        cpu_gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
        idx = batches.indices(step)
        x, y = images[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
        if config.data.random_flip:
            flip = torch.rand(x.shape[0], generator=gen, device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=gen, device=device)
        noise = torch.randn(x.shape, generator=gen, device=device)
        if num_classes:  # classifier-free guidance: the null label (index num_classes) replaces some labels
            drop = torch.rand(x.shape[0], generator=gen, device=device) < tc.label_dropout
            y = torch.where(drop, torch.full_like(y, num_classes), y)
        cond = y if num_classes else None
        n_no_grad = int(torch.randint(tc.no_grad_iters[0], tc.no_grad_iters[1] + 1, (1,), generator=cpu_gen))
        n_grad = int(torch.randint(tc.grad_iters[0], tc.grad_iters[1] + 1, (1,), generator=cpu_gen))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            losses, out = sjfb_losses(model, diffusion, solver, x, t, cond, noise, n_no_grad=n_no_grad, n_grad=n_grad,
                                      tol=tc.no_grad_tol)
            loss = losses["loss"].mean()
        value = loss.item()
        if not math.isfinite(value):
            raise FpdmRuntimeError(_nonfinite_message(step + 1, losses, out, last_ckpt))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        decay = min(tc.ema_decay, (1 + step) / (10 + step)) if tc.ema_warmup else tc.ema_decay
        ema_update(ema, model, decay)

        _accumulate(window, value, losses, out, n_no_grad, n_grad)
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            now = time.perf_counter()
            record = _record(window, done, (done - tick_step) * tc.batch_size / (now - tick), now - started)
            tick, tick_step, window = now, done, {}
            history.append(record)
            if is_main:
                with open(run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                if log is not None:
                    log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
        bar.update(1)
        if is_main and (done % tc.ckpt_every == 0 or done == tc.steps):
            trainer_state = {"step": done, "torch_rng": torch.get_rng_state()}
            last_ckpt = save_checkpoint(ckpt_root, done, model=model, ema=ema, optimizer=optimizer, config=config_dict,
                                        spec=spec, trainer_state=trainer_state, keep=tc.keep_checkpoints,
                                        fpdm_version=_version())
    bar.close()
    return TrainResult(run_dir, last_ckpt or ckpt_root, tc.steps, history)


def sjfb_losses(model: nn.Module, diffusion: GaussianDiffusion, solver: Solver, x: Tensor, t: Tensor,
                y: Tensor | None, noise: Tensor, *, n_no_grad: int, n_grad: int, tol: float = 0.0) -> tuple[dict[str, Tensor], Any]:
    """Per-sample losses of one S-JFB step and the denoiser's output: `n_no_grad` solver iterations under
    torch.no_grad, then `n_grad` iterations with autograd (DiT ignores both)."""
    outputs = []

    def model_fn(x_t: Tensor, t_model: Tensor) -> Tensor:
        out = model(x_t, t_model, y, iters=n_no_grad, solver=solver, tol=tol, grad_iters=n_grad)
        outputs.append(out)
        return out.pred

    losses = diffusion.training_losses(model_fn, x, t, noise=noise)
    return losses, outputs[-1]


def _accumulate(window: dict[str, float], loss: float, losses: dict[str, Tensor], out: Any, n_no_grad: int,
                n_grad: int) -> None:
    window["n"] = window.get("n", 0) + 1
    window["loss"] = window.get("loss", 0.0) + loss
    for key in ("mse", "vb"):
        if key in losses:
            window[key] = window.get(key, 0.0) + losses[key].mean().item()
    window["no_grad_iters"] = window.get("no_grad_iters", 0.0) + n_no_grad
    window["grad_iters"] = window.get("grad_iters", 0.0) + n_grad
    if out.stats is not None:  # relative residual of the no-grad phase's last step: is the block contracting?
        window["fp_residual"] = window.get("fp_residual", 0.0) + out.stats.residual.nanmean().item()
        window["fp_n"] = window.get("fp_n", 0) + 1


def _record(window: dict[str, float], step: int, img_per_s: float, elapsed: float) -> dict[str, Any]:
    n = window.pop("n")
    fp_n = window.pop("fp_n", 0)
    record: dict[str, Any] = {"step": step}
    for key, total in window.items():
        record[key] = total / (fp_n if key == "fp_residual" else n)
    record.update(img_per_s=img_per_s, elapsed_s=elapsed)
    return record


def _nonfinite_message(step: int, losses: dict[str, Tensor], out: Any, last_ckpt: Path | None) -> str:
    parts = [f"{k}={losses[k].float().mean().item():.4g}" for k in ("mse", "vb") if k in losses]
    where = "the fixed-point state" if out.z is not None and not torch.isfinite(out.z).all() else "the loss"
    keep = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written"
    return f"non-finite values in {where} at step {step} ({', '.join(parts)}); training stopped, {keep}"


def _progress(start: int, total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


def _version() -> str:
    from . import __version__

    return __version__
