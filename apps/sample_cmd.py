"""`fpdm sample CKPT`: images under a block budget, a grid, per-step stats and an optional plot."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from fpdm.build import build_schedule, load_denoiser
from fpdm.checkpoint import load_checkpoint
from fpdm.config import Config, from_dict
from fpdm.diffusion import GaussianDiffusion
from fpdm.errors import UsageError
from fpdm.registry import default_registry
from fpdm.sampling import generate, plan_iterations
from fpdm.training import resolve_device

from .encode_cmd import latent_decoder
from .plots import draw_plot, save_png, stack_images


def sample_command(parser: argparse.ArgumentParser):  # type: ignore[no-untyped-def]
    parser.add_argument("checkpoint", help="a run folder or a checkpoint folder")
    parser.add_argument("--n", type=int, default=64, help="number of images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (respaced)")
    parser.add_argument("--budget", type=int, help="transformer-block evaluations per sample (the paper's unit)")
    parser.add_argument("--iters", type=int, help="fixed-point iterations per step without --budget "
                        "(default: the config's solver.max_iter)")
    parser.add_argument("--sampler", default="ddpm", help="ddpm or ddim (or a plugin's)")
    parser.add_argument("--eta", type=float, help="DDIM eta (default 0)")
    parser.add_argument("--solver", help="fixed-point solver (default: the config's)")
    parser.add_argument("--tol", type=float, default=0.0, help="stop a sample's solve early at this residual")
    parser.add_argument("--allocator", default="uniform", help="how --budget is spread over the steps")
    parser.add_argument("--reuse", default="reuse", help="initial iterate per step: cold, reuse, extrapolate")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--cfg-channels", type=int, help="guide only the first N channels (official: 3)")
    parser.add_argument("--class", dest="classes", type=int, action="append", help="class id (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    parser.add_argument("--clip-x0", action="store_true", help="clip predicted x0 to [-1, 1]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="output folder (default: RUN/samples)")
    parser.add_argument("--vae", help="latent models: diffusers AutoencoderKL folder that decodes the samples")
    parser.add_argument("--plot", action="store_true", help="also write stats.png (residual, iterations per step)")
    parser.add_argument("--no-progress", action="store_true")

    def run(args: argparse.Namespace) -> int:
        for name in ("n", "batch_size", "steps"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        ckpt = load_checkpoint(args.checkpoint)
        config = from_dict(Config, ckpt.config)
        registry = default_registry()
        device = resolve_device(args.device)
        model = load_denoiser(ckpt, ema=args.ema, registry=registry).to(device)
        labels = _labels(args, model, ckpt.spec.get("class_names", []))
        decode = latent_decoder(ckpt.spec, args.vae, in_channels=model.in_channels, input_size=model.input_size,
                                device=device)  # None for pixel models
        schedule = build_schedule(config.diffusion, registry)
        base = GaussianDiffusion(schedule, prediction=config.diffusion.prediction, learn_sigma=config.model.learn_sigma)
        if args.steps > base.num_timesteps:
            raise UsageError(f"--steps must be <= {base.num_timesteps}, the training timesteps")
        timesteps = sorted(schedule.sampling_timesteps(args.steps).tolist())
        diffusion = base.respace(timesteps)
        update = registry.create("sampler", args.sampler, **({} if args.eta is None else {"eta": args.eta}))
        allocator = registry.create("allocator", args.allocator)
        reuse = registry.create("reuse_policy", args.reuse)
        solver = registry.create("solver", args.solver or config.solver.name,
                                 **({} if args.solver else config.solver.options))
        iterations = plan_iterations(model, timesteps[::-1], budget=args.budget,
                                     iters=args.iters if args.iters is not None else config.solver.max_iter,
                                     allocator=allocator)
        tol = allocator.tol or args.tol
        out = Path(args.out) if args.out else ckpt.path.parent.parent / "samples"
        tmp = _fresh_tmp(out)
        from tqdm.auto import tqdm

        with tqdm(total=args.n, unit="img", disable=args.no_progress) as bar:
            result = generate(model, diffusion, n=args.n, batch_size=args.batch_size, seed=args.seed, labels=labels,
                              progress=bar.update, shape=(model.in_channels, model.input_size, model.input_size),
                              update=update, solver=solver, iterations=iterations, reuse=reuse, tol=tol,
                              cfg_scale=args.cfg_scale, cfg_channels=args.cfg_channels, clip_x0=args.clip_x0,
                              adaptive=allocator.tol > 0, device=device, clip_output=decode is None)
        if decode is not None:  # latents -> images in [-1, 1]
            result = dataclasses.replace(result, images=decode(result.images))
        report = _report(args, ckpt, result, iterations, model, tol)
        _write(tmp, result, report, args.plot, labels)
        _replace(tmp, out)
        spent = report["blocks_per_sample"]
        print(f"{args.n} images, {args.steps} steps, blocks per sample mean {spent['mean']:.1f} max {spent['max']}"
              + (f" (budget {args.budget})" if args.budget else "") + f", {report['images_per_s']:.2f} img/s")
        print(f"grid: {out / 'grid.png'}\nstats: {out / 'stats.json'}")
        return 0

    return run


def _labels(args: argparse.Namespace, model, class_names: list[str]) -> list[int] | None:  # type: ignore[no-untyped-def]
    classes = model.num_classes
    if not classes:
        if args.classes or args.cfg_scale != 1.0:
            raise UsageError("this model is unconditional: --class and --cfg-scale do not apply")
        return None
    chosen = args.classes or list(range(classes))
    bad = [c for c in chosen if not 0 <= c < classes]
    if bad:
        names = f" ({', '.join(class_names)})" if class_names else ""
        raise UsageError(f"class id {bad[0]} out of range: the model has classes 0..{classes - 1}{names}")
    return chosen


def _report(args, ckpt, result, iterations, model, tol) -> dict:  # type: ignore[no-untyped-def]
    blocks = result.blocks
    return {
        "checkpoint": str(ckpt.path), "step": ckpt.step, "n": args.n, "steps": args.steps, "sampler": args.sampler,
        "solver": args.solver or ckpt.config["solver"]["name"], "allocator": args.allocator, "reuse": args.reuse,
        "tol": tol, "cfg_scale": args.cfg_scale, "seed": args.seed, "ema": args.ema, "budget": args.budget,
        "iterations_plan": iterations,
        "blocks_per_sample": {"mean": blocks.double().mean().item(), "max": int(blocks.max()),
                              "note": "one network evaluation per sample; guidance (cfg_scale != 1) doubles compute"},
        "images_per_s": args.n / result.seconds, "seconds": result.seconds, "per_step": result.steps,
    }


def _fresh_tmp(out: Path) -> Path:
    if out.exists() and any(out.iterdir()) and not (out / "stats.json").is_file():
        raise UsageError(f"{out} exists and is not an fpdm samples folder; choose another --out")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    return tmp


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (C, H, W)
    array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    return Image.fromarray(array.numpy())


def _write(tmp: Path, result, report: dict, plot: bool, labels) -> None:  # type: ignore[no-untyped-def]
    for k, image in enumerate(result.images):
        _to_pil(image).save(tmp / "images" / f"{k:06d}.png")
    rows = len(labels) if labels and len(labels) <= 16 and len(result.images) % len(labels) == 0 else None
    nrow = rows or math.ceil(math.sqrt(len(result.images)))
    grid = make_grid(result.images, nrow=nrow, padding=2, pad_value=1.0)  # (C, H, W) in [-1, 1]
    _to_pil(grid).resize((grid.shape[2] * 2, grid.shape[1] * 2), Image.NEAREST).save(tmp / "grid.png")
    (tmp / "stats.json").write_text(json.dumps(report, indent=2))
    if plot:
        steps = report["per_step"]
        panels = [
            draw_plot({"mean": [(s["step"], s["residual_mean"]) for s in steps],
                       "worst": [(s["step"], s["residual_max"]) for s in steps]},
                      title="final relative residual per step", xlabel="step", ylabel="residual", log_y=True),
            draw_plot({"allocated": [(s["step"], s["iterations"]) for s in steps],
                       "spent (mean)": [(s["step"], s["iterations_mean"]) for s in steps]},
                      title="fixed-point iterations per step", xlabel="step", ylabel="iterations"),
        ]
        save_png(stack_images(panels), tmp / "stats.png")


def _replace(tmp: Path, out: Path) -> None:
    """Swap the finished folder into place; an earlier samples folder at `out` is replaced only now."""
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
