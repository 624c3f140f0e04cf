"""`fpdm sample MODEL`: images under a block budget, a grid, per-step stats and an optional plot.

MODEL is a run, checkpoint or packed folder (flags -> `SampleConfig` -> `fpdm.load(MODEL).sample(...)`), or an
exported .onnx sampled by ONNX Runtime: the same options, schedules and reuse policies over an exported step
(iterations fixed at the exported K) or an exported whole loop. Top-level imports stay torch-free.
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

from fpdm.apps.cli import (
    Handler,
    add_device_option,
    add_json_option,
    add_model_argument,
    add_weights_option,
    write_json,
)
from fpdm.apps.sampling_setup import add_process_arguments, class_value, sample_config
from fpdm.errors import UsageError


def sample_command(parser: argparse.ArgumentParser) -> Handler:
    add_model_argument(
        parser,
        help="a run, checkpoint or packed model folder, or an exported .onnx (default: the run `fpdm train` writes)",
    )
    parser.add_argument("--n", type=int, default=64, help="number of images")
    parser.add_argument("--batch-size", type=int, default=64, help="images sampled at once")
    add_process_arguments(
        parser, steps=None, steps_help="sampling steps (respaced); default 50 (an exported whole loop: its own)"
    )
    parser.add_argument(
        "--iters",
        type=int,
        help="fixed-point iterations per step without --budget (default: the model's configured solver.max_iter)",
    )
    parser.add_argument("--solver", help="fixed-point solver (default: the model's configured one)")
    parser.add_argument(
        "--tol",
        type=float,
        default=0.0,
        help="stop a sample's solve early at this residual (with --allocator adaptive: its step-size-relative tol)",
    )
    parser.add_argument(
        "--class",
        dest="classes",
        type=class_value,
        action="append",
        metavar="CLASS",
        help="class id or name, repeatable, cycled over the images (default: every class in turn)",
    )
    parser.add_argument("--seed", type=int, default=0, help="image k is drawn from generator (seed, k)")
    add_weights_option(parser)
    add_device_option(parser)
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), help="default: onnxruntime for .onnx files")
    parser.add_argument(
        "--provider",
        default="auto",
        choices=("auto", "cuda", "cpu"),
        help="onnxruntime provider (auto: CUDA when it loads, else CPU; the one used is printed)",
    )
    parser.add_argument("--cuda-graph", action="store_true", help="onnxruntime CUDA: replay CUDA graphs")
    parser.add_argument(
        "--out",
        help="output folder (default: RUN/samples, DIR-samples beside a packed folder, "
        "or MODEL-samples beside an .onnx)",
    )
    parser.add_argument("--vae", help="latent models: diffusers AutoencoderKL folder that decodes the samples")
    parser.add_argument("--plot", action="store_true", help="also write stats.png (residual, iterations per step)")
    add_json_option(parser, help="also write the report (stats.json) to PATH; '-': stdout, instead of the summary")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--plan",
        metavar="FILE",
        help="with --budget: the plan file `fpdm plan --out FILE` wrote (default: the model's own plan, if any)",
    )
    parser.add_argument("--no-plan", action="store_true", help="with --budget: ignore any stored plan")

    def run(args: argparse.Namespace) -> int:
        from fpdm.apps.presets import default_run

        options = sample_config(args, output_type="tensor")  # cheap checks before anything is loaded
        if args.plan and args.no_plan:
            raise UsageError("--plan FILE and --no-plan contradict each other; give one")
        args.model = default_run(args.model)
        onnx = args.backend == "onnxruntime" or (args.backend is None and args.model.endswith(".onnx"))
        if args.backend == "torch" and args.model.endswith(".onnx"):
            raise UsageError("an .onnx file samples with --backend onnxruntime; the torch backend takes a model folder")
        drawn = _onnx(args, options) if onnx else _torch(args, options)
        _write(drawn, args)
        return 0

    return run


@dataclasses.dataclass(frozen=True)
class _Drawn:
    """What a backend sampled, and the report's description of how."""

    images: Any  # Tensor (N, C, H, W) in [-1, 1], CPU
    labels: list[int] | None
    blocks: Any  # Tensor (N,)
    steps: list[dict[str, float]]
    seconds: float
    source: dict[str, Any]  # model, step, solver, plan ...
    names: dict[str, Any]  # sampler, allocator, reuse, budget, cfg_scale ...
    out: Path
    backend: str
    cycle: int  # classes the labels cycle through (the grid puts one per column)


def _torch(args: argparse.Namespace, options: Any) -> _Drawn:
    from fpdm.pipeline import load

    if args.provider != "auto" or args.cuda_graph:
        raise UsageError("--provider and --cuda-graph apply to the onnxruntime backend (an exported .onnx)")
    pipe = load(args.model, device=args.device, weights=args.weights)
    out = Path(args.out) if args.out else pipe.output_dir("samples")
    _check_out(out)
    result = pipe.sample(options, vae=args.vae, plan=False if args.no_plan else args.plan or True)
    plan = result.plan
    source = {
        "checkpoint": str(pipe.path),
        "step": pipe.step,
        "weights": pipe.weights,
        "solver": plan["solver"],
        "tol": plan["tol"],
        "iterations_plan": plan["iterations"],
        "stored_plan": plan["stored_plan"],
    }
    labels = None if result.labels is None else result.labels.tolist()
    return _Drawn(
        result.images,
        labels,
        result.blocks,
        result.stats,
        result.seconds,
        source,
        {k: plan[k] for k in ("spacing", "sampler", "allocator", "reuse", "cfg_scale", "budget", "budget_blocks")},
        out,
        f"torch {pipe.device.type}",
        len(options.classes or ()) or pipe.denoiser.num_classes,
    )


def _onnx(args: argparse.Namespace, options: Any) -> _Drawn:
    import torch

    from fpdm.export.ort import OrtDenoiser, OrtLoop, OrtSession, session_summary
    from fpdm.io.vae_weights import latent_decoder
    from fpdm.pipeline import class_ids

    if args.solver or args.tol or args.iters is not None or args.weights != "ema":
        raise UsageError(
            "--solver, --tol, --iters and --weights are fixed when a graph is exported; export again to change them"
        )
    if args.plan or args.no_plan:
        raise UsageError("--plan and --no-plan apply to model folders; an .onnx graph runs the choices given here")
    session = OrtSession(args.model, provider=args.provider, cuda_graph=args.cuda_graph)
    if session.cuda_graph and options.n % options.batch_size:
        raise UsageError("--cuda-graph replays one batch size: make --n a multiple of --batch-size")
    meta, path = session.meta, Path(args.model)
    source = {
        "onnx": str(path),
        "checkpoint": meta["source"].get("checkpoint"),
        "step": meta["source"].get("step"),
        "solver": (meta.get("solver") or {}).get("name"),
        "provider": session.provider,
    }
    out = Path(args.out) if args.out else path.with_name(f"{path.stem}-samples")
    _check_out(out)
    model = OrtLoop(session) if meta["kind"] == "loop" else OrtDenoiser(session)
    labels = class_ids(options.classes, meta["spec"].get("class_names", []), model.num_classes)
    device = torch.device("cuda" if session.cuda else "cpu")
    decode = latent_decoder(
        meta["spec"], args.vae, in_channels=model.in_channels, input_size=model.input_size, device=device
    )  # None for pixel models
    if isinstance(model, OrtLoop):
        result, names, plan = _onnx_loop(args, options, model, labels)
    else:
        result, names, plan = _onnx_step(args, options, model, labels, device)
    images = result.images if decode is None else decode(result.images)  # latents -> images in [-1, 1]
    return _Drawn(
        images,
        labels,
        result.blocks,
        result.steps,
        result.seconds,
        {**source, **plan},
        names,
        out,
        session_summary(session),
        len(options.classes or ()) or model.num_classes,
    )


def _onnx_loop(
    args: argparse.Namespace, options: Any, loop: Any, labels: list[int] | None
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from fpdm.diffusion.sampling import generate_batches

    meta = loop.meta
    given = [
        f"--{k.replace('_', '-')}" for k in ("steps", "budget", "eta", "cfg_channels") if getattr(args, k) is not None
    ]
    given += [
        f"--{k}"
        for k, default in (("sampler", "ddpm"), ("allocator", "uniform"), ("reuse", "reuse"))
        if getattr(args, k) != default
    ]
    if args.spacing is not None and args.spacing != meta["sampling"]["spacing"]:
        given.append(f"--spacing {args.spacing}")
    if given or args.cfg_scale != 1.0 or args.clip_x0 or args.guidance_rescale:
        raise UsageError(
            f"this whole-loop graph fixes the sampling choices at export "
            f"({json.dumps(meta['sampling'])}); drop {', '.join(given) or '--cfg-scale/--guidance-rescale/--clip-x0'}"
        )
    result = _with_progress(
        options,
        lambda bar: generate_batches(
            loop, n=options.n, batch_size=options.batch_size, seed=options.seed, labels=labels, progress=bar
        ),
    )
    return result, dict(meta["sampling"]), {"iterations_plan": loop.iterations, "sampling": meta["sampling"]}


def _onnx_step(
    args: argparse.Namespace, options: Any, model: Any, labels: list[int] | None, device: Any
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from fpdm.config import Config, from_dict
    from fpdm.diffusion.plan import generate_planned, sampling_parts
    from fpdm.registry import default_registry

    meta = model.meta
    if args.allocator != "uniform" and model.fixed_point:
        raise UsageError(
            f"the ONNX graph runs exactly K={model.iters} iterations at every step, so the allocation "
            f"is fixed; --allocator {args.allocator} needs the PyTorch backend (or one export per K)"
        )
    parts = sampling_parts(
        from_dict(Config, meta["config"]), model, options, registry=default_registry(), iters=model.iters
    )
    if model.fixed_point and set(parts.iterations) != {model.iters}:
        raise UsageError(
            f"--budget {options.budget} would need {sorted(set(parts.iterations))} iterations per "
            f"step; the graph runs exactly K={model.iters}: use --budget "
            f"{options.steps * model.blocks_per_call(model.iters)} or drop --budget"
        )
    result = _with_progress(
        options,
        lambda bar: generate_planned(
            model,
            parts,
            options,
            labels=labels,
            solver=None,
            device=device,
            clip_output="latent" not in meta["spec"],
            progress=bar,
        ),
    )
    return result, parts.names, {"iterations_plan": parts.iterations}


def _with_progress(options: Any, draw: Any) -> Any:
    from tqdm.auto import tqdm

    with tqdm(total=options.n, unit="img", disable=not options.progress) as bar:
        return draw(bar.update)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "stats.json").is_file())):
        raise UsageError(f"{out} exists and is not an fpdm samples folder; choose another --out")


def _write(drawn: _Drawn, args: argparse.Namespace) -> None:
    """Images, grid, stats.json (and stats.png) into a hidden folder, swapped into place when complete."""
    out = drawn.out
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    try:
        report = _report(drawn, args)
        _files(tmp, drawn, report, args.plot)
        if out.exists():  # an earlier samples folder at `out` is replaced only now
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if args.json is not None:
        write_json(report, args.json)
    if args.json == "-":
        return
    spent = report["blocks_per_sample"]
    print(
        f"{report['n']} images, {report['steps']} steps, blocks per sample mean {spent['mean']:.1f} "
        f"max {spent['max']}"
        + (f" (budget {_budget(report)})" if report["budget"] else "")
        + f", {report['images_per_s']:.2f} img/s, {drawn.backend}"
    )
    print(f"grid: {out / 'grid.png'}\nstats: {out / 'stats.json'}")


def _budget(report: dict[str, Any]) -> str:
    """The budget as the summary says it: "60", or "10dit = 60 blocks" for a budget in DiT steps."""
    blocks = report.get("budget_blocks")
    return str(report["budget"]) if blocks in (None, report["budget"]) else f"{report['budget']} = {blocks} blocks"


def _report(drawn: _Drawn, args: argparse.Namespace) -> dict[str, Any]:
    blocks, n = drawn.blocks, len(drawn.images)
    return {
        **drawn.source,
        "backend": drawn.backend,
        "n": n,
        "steps": len(drawn.steps),
        "seed": args.seed,
        **{
            k: drawn.names.get(k)
            for k in ("spacing", "sampler", "allocator", "reuse", "cfg_scale", "budget", "budget_blocks")
        },
        "blocks_per_sample": {
            "mean": blocks.double().mean().item(),
            "max": int(blocks.max()),
            "note": "one network evaluation per sample; guidance (cfg_scale != 1) doubles compute",
        },
        "images_per_s": n / drawn.seconds,
        "seconds": drawn.seconds,
        "per_step": drawn.steps,
    }


def _files(tmp: Path, drawn: _Drawn, report: dict[str, Any], plot: bool) -> None:
    from PIL import Image
    from torchvision.utils import make_grid

    from fpdm.apps.plots import draw_plot, save_png, stack_images
    from fpdm.data.images import to_pil

    images, cycle = drawn.images, drawn.cycle
    for k, image in enumerate(to_pil(images)):
        image.save(tmp / "images" / f"{k:06d}.png")
    rows = cycle if drawn.labels and 1 <= cycle <= 16 and len(images) % cycle == 0 else None
    nrow = rows or math.ceil(math.sqrt(len(images)))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)  # (C, H, W) in [-1, 1]
    to_pil(grid[None])[0].resize((grid.shape[2] * 2, grid.shape[1] * 2), Image.Resampling.NEAREST).save(
        tmp / "grid.png"
    )
    (tmp / "stats.json").write_text(json.dumps(report, indent=2))
    if plot:
        steps = report["per_step"]
        panels = [
            draw_plot(
                {
                    "mean": [(s["step"], s["residual_mean"]) for s in steps],
                    "worst": [(s["step"], s["residual_max"]) for s in steps],
                },
                title="final relative residual per step",
                xlabel="step",
                ylabel="residual",
                log_y=True,
            ),
            draw_plot(
                {
                    "allocated": [(s["step"], s["iterations"]) for s in steps],
                    "spent (mean)": [(s["step"], s["iterations_mean"]) for s in steps],
                },
                title="fixed-point iterations per step",
                xlabel="step",
                ylabel="iterations",
            ),
        ]
        save_png(stack_images(panels), tmp / "stats.png")
