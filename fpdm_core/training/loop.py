"""The training loop: S-JFB for FPDM (Bai & Melas-Kyriazi 2024, sec. 3.3), plain backprop for DiT.

Every random draw of a step (batch, timesteps, noise, label dropout, S-JFB iteration counts) comes from a
generator seeded by (seed, step), so a resumed run continues exactly where it stopped and every rank of a
distributed run draws the same iteration counts. The learning rate is a function of the step too (`lr_at`).

Under torchrun the loop is data-parallel (DDP): `train.batch_size` is the GLOBAL batch. Every rank draws the
whole global batch's indices, timesteps, noise, flips and label drops from the same generators and keeps its
own contiguous slice, so sample i's draws at step k depend on (seed, k, i) alone, not on the world size or on
the `train.grad_accum` micro-batches the slice is split into. N ranks and M micro-batches compute the same step
one process would on the whole batch (gradients of equal-size mean losses, averaged). Every rank keeps its own
EMA, bit-identical since the weights are; only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fpdm.build import (
    build_dataset,
    build_denoiser,
    build_schedule,
    build_solver,
    check_compatible,
    denoiser_options,
    resolve_device,
)
from fpdm.config import Config, TrainConfig, to_dict
from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.errors import FpdmRuntimeError, UsageError
from fpdm.interfaces import Solver
from fpdm.io.checkpoint import RunLock, list_checkpoints, load_checkpoint, save_checkpoint, write_text_atomic
from fpdm.registry import Registry
from fpdm.training.distributed import (
    DistContext,
    barrier,
    check_in_sync,
    check_same_config,
    distributed,
    gradient_sync,
    mean_across_ranks,
    micro_batches,
    shard,
    wrap_model,
)
from fpdm.training.lr_schedule import lr_at
from fpdm.training.metrics import LogWindow, MetricsLog, check_tensorboard, trim_metrics
from fpdm.training.weighting import weight_losses, weight_table

Logger = Callable[[dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    checkpoint: Path
    step: int
    history: list[dict[str, Any]]
    rank: int = 0  # the process's rank under torchrun: only rank 0 should report


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        e: list[Tensor] = list(ema.parameters())
        m: list[Tensor] = list(model.parameters())
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


def train(
    config: Config,
    *,
    resume: bool = False,
    registry: Registry | None = None,
    progress: bool = True,
    is_main: bool = True,
    log: Logger | None = None,
) -> TrainResult:
    """Train the configured model; checkpoints and metrics.jsonl go to `config.train.out_dir`. Under torchrun
    this process joins the process group for the run (and leaves it, errors included)."""
    if config.train.tensorboard:  # before anything is built or written
        check_tensorboard()
    with distributed(resolve_device(config.train.device)) as ctx:
        check_same_config(ctx, to_dict(config))
        # One live run per folder: rank 0 holds the lock (a dead holder's lock is taken over).
        lock = RunLock(Path(config.train.out_dir)) if is_main and ctx.is_main else contextlib.nullcontext()
        with lock:
            return _train(
                config,
                ctx,
                resume=resume,
                registry=registry,
                progress=progress,
                is_main=is_main and ctx.is_main,
                log=log,
            )


def _train(
    config: Config,
    ctx: DistContext,
    *,
    resume: bool,
    registry: Registry | None,
    progress: bool,
    is_main: bool,
    log: Logger | None,
) -> TrainResult:
    tc = config.train
    device = ctx.device
    run_dir, started = Path(tc.out_dir), time.perf_counter()
    ckpt_root = run_dir / "checkpoints"
    if not resume and list_checkpoints(ckpt_root):
        raise UsageError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another --out")
    part = shard(ctx, tc.batch_size, grad_accum=tc.grad_accum)  # this rank's slice of every global batch
    micro = micro_batches(part.stop - part.start, tc.grad_accum)  # its micro-batches, indices into the slice
    torch.manual_seed(tc.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tc.tf32

    dataset = build_dataset(config.data)
    images, labels = dataset.tensors()  # (N, C, H, W) in [-1, 1], (N,)
    family, options = denoiser_options(
        config.model, input_size=dataset.image_size, in_channels=dataset.channels, num_classes=dataset.num_classes
    )
    spec = {"denoiser": family, "options": options, "class_names": list(dataset.class_names)}
    if config.data.name == "latents":  # samples are latents: `fpdm sample --vae` decodes them with this scale
        spec["latent"] = {"scale_factor": float(config.data.scale_factor)}
    model = build_denoiser(
        config.model,
        input_size=dataset.image_size,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes,
        checkpoint=tc.checkpoint_activations,
        registry=registry,
    )
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    diffusion = GaussianDiffusion(
        build_schedule(config.diffusion, registry),
        prediction=config.diffusion.prediction,
        learn_sigma=config.model.learn_sigma,
    )
    mse_weights = weight_table(  # (T,) Min-SNR-gamma weight per timestep, or None
        diffusion.alphas_cumprod, gamma=tc.min_snr_gamma, prediction=diffusion.prediction, device=device
    )
    solver = build_solver(config.solver, registry)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    config_dict, start = to_dict(config), 0
    if resume:
        ckpt = load_checkpoint(run_dir)
        check_compatible(ckpt.config, config_dict, ("model", "diffusion", "data"))
        _restore(ckpt, model, ema, optimizer)
        start = ckpt.step
        if start >= tc.steps:
            raise UsageError(
                f"{run_dir} is already at step {start} of train.steps={tc.steps}; raise train.steps to continue"
            )
    if tc.compile:
        for block in model.block_modules():  # per block: one graph reused by every fixed-point iteration
            block.compile()
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", json.dumps(config_dict, indent=2, sort_keys=True))
        if resume:  # the steps after the checkpoint will run again: drop their records (and a line a kill tore)
            trim_metrics(run_dir / "metrics.jsonl", start)
    # A fixed-point block skipped by a step (n_grad = 0) gets no gradient: DDP must be told to look for that.
    net = wrap_model(ctx, model, find_unused=tc.grad_iters[0] == 0)

    batches = _Batches(len(images), tc.batch_size, tc.seed)
    global_batch, num_classes = tc.batch_size, dataset.num_classes
    history: list[dict[str, Any]] = []
    window = LogWindow()
    last_ckpt = None
    skipped = 0  # non-finite batches skipped so far (train.skip_nonfinite allows that many)
    bar = _progress(start, tc.steps, progress and is_main)
    tick, tick_step = time.perf_counter(), start
    metrics = MetricsLog(run_dir, tensorboard=tc.tensorboard, start=start) if is_main else None  # rank 0 logs
    with contextlib.closing(metrics) if metrics is not None else contextlib.nullcontext():
        for step in range(start, tc.steps):
            lr = _set_lr(optimizer, tc, step)
            gen = torch.Generator(device=device).manual_seed(tc.seed * 1_000_003 + step)
            cpu_gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
            idx = batches.indices(step)[part]  # this rank's slice of the global batch
            x, y = images[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
            # Draws cover the global batch, then are sliced: a sample's draws do not depend on the world size.
            if config.data.random_flip:
                flip = (torch.rand(global_batch, generator=gen, device=device) < 0.5)[part]
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            t = torch.randint(0, diffusion.num_timesteps, (global_batch,), generator=gen, device=device)[part]
            noise = torch.randn((global_batch, *x.shape[1:]), generator=gen, device=device)[part]
            if num_classes:  # classifier-free guidance: the null label (index num_classes) replaces some labels
                drop = (torch.rand(global_batch, generator=gen, device=device) < tc.label_dropout)[part]
                y = torch.where(drop, torch.full_like(y, num_classes), y)
            # One S-JFB draw per optimizer step, shared by its micro-batches.
            n_no_grad = int(torch.randint(tc.no_grad_iters[0], tc.no_grad_iters[1] + 1, (1,), generator=cpu_gen))
            n_grad = int(torch.randint(tc.grad_iters[0], tc.grad_iters[1] + 1, (1,), generator=cpu_gen))
            optimizer.zero_grad(set_to_none=True)
            acc = _accumulate_gradients(
                net,
                diffusion,
                solver,
                ctx,
                x,
                t,
                y if num_classes else None,
                noise,
                micro=micro,
                mse_weights=mse_weights,
                n_no_grad=n_no_grad,
                n_grad=n_grad,
                tol=tc.no_grad_tol,
                use_bf16=use_bf16,
            )
            value = acc.means["loss"]
            grad_norm = math.nan
            if math.isfinite(value):
                # The averaged gradients' norm is the same on every rank, so all ranks skip or stop together; an
                # inf gradient under a finite loss would otherwise poison the weights and the next checkpoint.
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf))
            if math.isfinite(value) and math.isfinite(grad_norm):
                optimizer.step()
                decay = min(tc.ema_decay, (1 + step) / (10 + step)) if tc.ema_warmup else tc.ema_decay
                ema_update(ema, model, decay)
                window.add(
                    acc.means, acc.residual, n_no_grad, n_grad, grad_norm=grad_norm, grad_clip=tc.grad_clip, lr=lr
                )
            else:  # a non-finite step changes nothing: no optimizer step, no EMA update, no statistics
                skipped += 1
                what = _nonfinite_message(step + 1, value, acc.losses, acc.out)
                if skipped > tc.skip_nonfinite:
                    keep = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written"
                    allowed = (
                        f"after {tc.skip_nonfinite} skipped batch(es)"
                        if tc.skip_nonfinite
                        else "(train.skip_nonfinite=N skips up to N such batches)"
                    )
                    raise FpdmRuntimeError(f"{what}; training stopped {allowed}, {keep}")
                window.skipped += 1
                if is_main:
                    bar.write(
                        f"fpdm train: warning: {what}; batch skipped ({skipped} of train.skip_nonfinite="
                        f"{tc.skip_nonfinite})",
                        file=sys.stderr,
                    )
            done = step + 1
            if (done % tc.log_every == 0 or done == tc.steps) and window.n:
                now = time.perf_counter()
                record = window.record(done, (done - tick_step) * tc.batch_size / (now - tick), now - started)
                tick, tick_step, window = now, done, LogWindow()
                history.append(record)
                if metrics is not None:
                    metrics.write(record)
                    if log is not None:
                        log(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", grad=f"{record['grad_norm']:.3g}", img_s=f"{record['img_per_s']:.0f}"
                )
            bar.update(1)
            saving = done % tc.ckpt_every == 0 or done == tc.steps
            if is_main and saving:
                trainer_state = {"step": done, "torch_rng": torch.get_rng_state()}
                last_ckpt = save_checkpoint(
                    ckpt_root,
                    done,
                    model=model,
                    ema=ema,
                    optimizer=optimizer,
                    config=config_dict,
                    spec=spec,
                    trainer_state=trainer_state,
                    keep=tc.keep_checkpoints,
                    fpdm_version=_version(),
                )
            if saving:  # no rank runs ahead of (or exits before) rank 0's save
                barrier(ctx)
    bar.close()
    check_in_sync(ctx, model, ema)
    return TrainResult(run_dir, last_ckpt or ckpt_root, tc.steps, history, rank=ctx.rank)


def _set_lr(optimizer: torch.optim.Optimizer, tc: TrainConfig, step: int) -> float:
    """Set and return step `step`'s learning rate: a function of the step, so resuming needs no scheduler state
    (the optimizer's saved lr is overwritten here, and a changed train.lr takes effect)."""
    lr = lr_at(
        step,
        lr=tc.lr,
        total_steps=tc.steps,
        schedule=tc.lr_schedule,
        warmup_steps=tc.warmup_steps,
        min_lr_ratio=tc.min_lr_ratio,
    )
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclasses.dataclass
class _Accumulated:
    """What one optimizer step's micro-batches left besides their summed gradients: global-batch means of the
    loss terms (a non-finite "loss" if a micro-batch went non-finite, which then stopped the step), the mean
    no-grad residual (None for DiT), and the last micro-batch's losses and output, for an error message."""

    means: dict[str, float]
    residual: float | None
    losses: dict[str, Tensor]
    out: Any


def _accumulate_gradients(
    net: nn.Module,
    diffusion: GaussianDiffusion,
    solver: Solver,
    ctx: DistContext,
    x: Tensor,
    t: Tensor,
    y: Tensor | None,
    noise: Tensor,
    *,
    micro: list[slice],
    mse_weights: Tensor | None,
    n_no_grad: int,
    n_grad: int,
    tol: float,
    use_bf16: bool,
) -> _Accumulated:
    """Forward and backward of this rank's samples (x (B, C, H, W), t (B,), y (B,) or None, noise like x) in
    micro-batches: each backpropagates its mean loss / len(micro), so the gradients sum to those of the whole
    batch's mean loss. DDP all-reduces once, in the last micro-batch's backward."""
    means: dict[str, float] = {}
    residuals: list[float] = []
    losses: dict[str, Tensor] = {}
    out: Any = None
    for m, part in enumerate(micro):
        with gradient_sync(net, sync=m == len(micro) - 1):
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                y_part = None if y is None else y[part]
                losses, out = sjfb_losses(
                    net,
                    diffusion,
                    solver,
                    x[part],
                    t[part],
                    y_part,
                    noise[part],
                    n_no_grad=n_no_grad,
                    n_grad=n_grad,
                    tol=tol,
                )
                if mse_weights is not None:
                    losses = weight_losses(losses, mse_weights[t[part]])
                loss = losses["loss"].mean() / len(micro)
            # Every rank sees the same numbers, so all skip (or stop) together on a non-finite micro-batch.
            part_means = _global_means(ctx, losses)
            if not math.isfinite(part_means["loss"]):
                return _Accumulated({**means, "loss": part_means["loss"]}, None, losses, out)
            loss.backward()
        for key, mean in part_means.items():
            means[key] = means.get(key, 0.0) + mean / len(micro)
        if out.stats is not None:  # relative residual of the no-grad phase's last step: is the block contracting?
            residuals.append(out.stats.residual.nanmean().item())
    residual = sum(residuals) / len(residuals) if residuals else None
    return _Accumulated(means, residual, losses, out)


def sjfb_losses(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    solver: Solver,
    x: Tensor,
    t: Tensor,
    y: Tensor | None,
    noise: Tensor,
    *,
    n_no_grad: int,
    n_grad: int,
    tol: float = 0.0,
) -> tuple[dict[str, Tensor], Any]:
    """Per-sample losses of one S-JFB step and the denoiser's output: `n_no_grad` solver iterations under
    torch.no_grad, then `n_grad` iterations with autograd (DiT ignores both)."""
    outputs = []

    def model_fn(x_t: Tensor, t_model: Tensor) -> Tensor:
        out = model(x_t, t_model, y, iters=n_no_grad, solver=solver, tol=tol, grad_iters=n_grad)
        outputs.append(out)
        return out.pred

    losses = diffusion.training_losses(model_fn, x, t, noise=noise)
    return losses, outputs[-1]


def _global_means(ctx: DistContext, losses: dict[str, Tensor]) -> dict[str, float]:
    """Batch means of the loss terms over the global batch: one small all-reduce of the ranks' equal-shard means."""
    keys = [key for key in ("loss", "mse", "vb") if key in losses]
    local = torch.stack([losses[key].detach().float().mean() for key in keys])  # (K,)
    return dict(zip(keys, mean_across_ranks(ctx, local).tolist()))


def _nonfinite_message(step: int, loss: float, losses: dict[str, Tensor], out: Any) -> str:
    """Which part went non-finite first: the fixed-point state feeds the loss, the loss feeds the gradients."""
    parts = [f"{k}={losses[k].detach().float().mean().item():.4g}" for k in ("mse", "vb") if k in losses]
    if out.z is not None and not torch.isfinite(out.z).all():
        where = "the fixed-point state"
    elif not math.isfinite(loss):
        where = "the loss"
    else:
        where = f"the gradients (loss {loss:.4g} finite)"
    return f"non-finite values in {where} at step {step} ({', '.join(parts)})"


def _restore(ckpt: Any, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights, optimizer state and the torch RNG of a checkpoint; a file that does not fit is one UsageError."""
    opt_state, trainer_state = ckpt.training_state()
    try:
        model.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
        optimizer.load_state_dict(opt_state)
        torch.set_rng_state(trainer_state["torch_rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(
            f"{ckpt.path} does not fit this run's model or optimizer: {type(exc).__name__}: {first}"
        ) from None


def _progress(start: int, total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


def _version() -> str:
    from fpdm.version import __version__

    return __version__
