"""`fpdm sample CKPT|MODEL.onnx`: images under a block budget, a grid, per-step stats and an optional plot.

The PyTorch backend samples a checkpoint; the ONNX Runtime backend samples an exported step (the same loop,
schedules and reuse policies, with the iterations fixed at the exported K) or an exported whole loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.utils import make_grid

from fpdm.config import Config, from_dict
from fpdm.errors import UsageError
from fpdm.registry import default_registry
from fpdm.diffusion.sampling import generate

from fpdm.io.vae_weights import latent_decoder
from fpdm.apps.plots import draw_plot, save_png, stack_images
from fpdm.apps.presets import default_run
from fpdm.apps.sampling_setup import add_process_arguments, load_for_sampling, sampling_parts


def sample_command(parser: argparse.ArgumentParser):  # type: ignore[no-untyped-def]
    parser.add_argument("checkpoint", nargs="?",
                        help="a run or checkpoint folder, or an exported .onnx (default: the run `fpdm train` writes)")
    parser.add_argument("--n", type=int, default=64, help="number of images")
    parser.add_argument("--batch-size", type=int, default=64)
    add_process_arguments(parser, steps=None)  # --steps (default 50), --budget, --sampler, --allocator, ...
    parser.add_argument("--iters", type=int, help="fixed-point iterations per step without --budget "
                        "(default: the config's solver.max_iter)")
    parser.add_argument("--solver", help="fixed-point solver (default: the config's)")
    parser.add_argument("--tol", type=float, default=0.0, help="stop a sample's solve early at this residual "
                        "(with --allocator adaptive: its step-size-relative tol)")
    parser.add_argument("--class", dest="classes", type=int, action="append", help="class id (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), help="default: onnxruntime for .onnx files")
    parser.add_argument("--provider", default="auto", choices=("auto", "cuda", "cpu"),
                        help="onnxruntime provider (auto: CUDA when it loads, else CPU; the one used is printed)")
    parser.add_argument("--cuda-graph", action="store_true", help="onnxruntime CUDA: replay CUDA graphs")
    parser.add_argument("--out", help="output folder (default: RUN/samples, or MODEL-samples beside an .onnx)")
    parser.add_argument("--vae", help="latent models: diffusers AutoencoderKL folder that decodes the samples")
    parser.add_argument("--plot", action="store_true", help="also write stats.png (residual, iterations per step)")
    parser.add_argument("--no-progress", action="store_true")

    def run(args: argparse.Namespace) -> int:
        for name in ("n", "batch_size"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        args.checkpoint = default_run(args.checkpoint)
        onnx = args.backend == "onnxruntime" or (args.backend is None and args.checkpoint.endswith(".onnx"))
        if args.backend == "torch" and args.checkpoint.endswith(".onnx"):
            raise UsageError("an .onnx file samples with --backend onnxruntime; the torch backend takes a checkpoint")
        job = _onnx_job(args) if onnx else _torch_job(args)
        labels = _labels(args, job.model, job.spec.get("class_names", []))
        decode = latent_decoder(job.spec, args.vae, in_channels=job.model.in_channels,
                                input_size=job.model.input_size, device=job.device)  # None for pixel models
        out = Path(args.out) if args.out else job.default_out
        tmp = _fresh_tmp(out)
        from tqdm.auto import tqdm

        shape = (job.model.in_channels, job.model.input_size, job.model.input_size)
        with tqdm(total=args.n, unit="img", disable=args.no_progress) as bar:
            result = generate(job.model, job.diffusion, n=args.n, batch_size=args.batch_size, seed=args.seed,
                              labels=labels, progress=bar.update, shape=shape, cfg_scale=args.cfg_scale,
                              cfg_channels=args.cfg_channels, clip_x0=args.clip_x0, device=job.device,
                              clip_output=decode is None, **job.options)
        if decode is not None:  # latents -> images in [-1, 1]
            result = dataclasses.replace(result, images=decode(result.images))
        report = _report(args, job, result)
        _write(tmp, result, report, args.plot, labels)
        _replace(tmp, out)
        spent = report["blocks_per_sample"]
        print(f"{args.n} images, {len(result.steps)} steps, blocks per sample mean {spent['mean']:.1f} "
              f"max {spent['max']}" + (f" (budget {args.budget})" if args.budget else "")
              + f", {report['images_per_s']:.2f} img/s, {job.backend}")
        print(f"grid: {out / 'grid.png'}\nstats: {out / 'stats.json'}")
        return 0

    return run


@dataclasses.dataclass
class _Job:
    """What the backends hand to the shared sampling and writing code."""

    model: Any  # a Denoiser, or its ONNX Runtime stand-in
    diffusion: Any
    options: dict[str, Any]  # generate()'s remaining keywords: update, solver, iterations, reuse, tol, ...
    spec: dict[str, Any]
    source: dict[str, Any]  # for the report: checkpoint or onnx path, step, solver, plan
    default_out: Path
    device: torch.device
    backend: str


def _torch_job(args: argparse.Namespace) -> _Job:
    if args.provider != "auto" or args.cuda_graph:
        raise UsageError("--provider and --cuda-graph apply to the onnxruntime backend (an exported .onnx)")
    args.steps = 50 if args.steps is None else args.steps
    job = load_for_sampling(args, args.checkpoint)
    tol = job.parts.tolerances
    source = {"checkpoint": str(job.ckpt.path), "step": job.ckpt.step, "ema": args.ema, "solver": job.solver_name,
              "tol": tol, "iterations_plan": job.parts.iterations}
    return _Job(job.model, job.parts.diffusion, job.generate_options(), job.ckpt.spec, source,
                job.ckpt.path.parent.parent / "samples", job.device, "torch " + job.device.type)


def _onnx_job(args: argparse.Namespace) -> _Job:
    from fpdm.export.ort import OrtDenoiser, OrtLoop, OrtSession, run_loop, session_summary

    if args.solver or args.tol or args.iters is not None or not args.ema:
        raise UsageError("--solver, --tol, --iters and --no-ema are fixed when a graph is exported; "
                         "export again to change them")
    session = OrtSession(args.checkpoint, provider=args.provider, cuda_graph=args.cuda_graph)
    if session.cuda_graph and args.n % args.batch_size:
        raise UsageError("--cuda-graph replays one batch size: make --n a multiple of --batch-size")
    meta, path = session.meta, Path(args.checkpoint)
    config = from_dict(Config, meta["config"])
    source = {"onnx": str(path), "checkpoint": meta["source"].get("checkpoint"), "step": meta["source"].get("step"),
              "solver": (meta.get("solver") or {}).get("name"), "provider": session.provider}
    default_out = path.with_name(f"{path.stem}-samples")
    device = torch.device("cuda" if session.cuda else "cpu")
    if meta["kind"] == "loop":
        given = [f"--{k.replace('_', '-')}" for k in ("steps", "budget", "eta", "cfg_channels")
                 if getattr(args, k) is not None]
        given += [f"--{k}" for k, default in (("sampler", "ddpm"), ("allocator", "uniform"), ("reuse", "reuse"))
                  if getattr(args, k) != default]
        if given or args.cfg_scale != 1.0 or args.clip_x0:
            raise UsageError(f"this whole-loop graph fixes the sampling choices at export "
                             f"({json.dumps(meta['sampling'])}); drop {', '.join(given) or '--cfg-scale/--clip-x0'}")
        loop = OrtLoop(session)
        for key, value in meta["sampling"].items():  # the report tells what the graph does
            setattr(args, key, value)
        options = {"run": run_loop(loop)}
        return _Job(loop, None, options, meta["spec"], {**source, "iterations_plan": loop.iterations,
                    "sampling": meta["sampling"]}, default_out, device, session_summary(session))
    model = OrtDenoiser(session)
    args.steps = 50 if args.steps is None else args.steps
    if args.allocator != "uniform" and model.fixed_point:
        raise UsageError(f"the ONNX graph runs exactly K={model.iters} iterations at every step, so the allocation "
                         f"is fixed; --allocator {args.allocator} needs the PyTorch backend (or one export per K)")
    parts = sampling_parts(args, config, model, default_registry(), iters=model.iters)  # type: ignore[arg-type]
    if model.fixed_point and set(parts.iterations) != {model.iters}:
        raise UsageError(f"--budget {args.budget} would need {sorted(set(parts.iterations))} iterations per step; "
                         f"the graph runs exactly K={model.iters}: use --budget "
                         f"{args.steps * model.blocks_per_call(model.iters)} or drop --budget")
    options = {"update": parts.update, "solver": None, "iterations": parts.iterations, "reuse": parts.reuse}
    return _Job(model, parts.diffusion, options, meta["spec"], {**source, "iterations_plan": parts.iterations},
                default_out, device, session_summary(session))


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


def _report(args: argparse.Namespace, job: _Job, result: Any) -> dict[str, Any]:
    blocks = result.blocks
    return {
        **job.source, "backend": job.backend, "n": args.n, "steps": len(result.steps), "sampler": args.sampler,
        "allocator": args.allocator, "reuse": args.reuse, "cfg_scale": args.cfg_scale, "seed": args.seed,
        "budget": args.budget,
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
