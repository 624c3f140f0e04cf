"""`fpdm export CKPT --onnx --iters K`: one denoising step (or the whole loop) as a verified .onnx file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fpdm.build import load_denoiser
from fpdm.io.checkpoint import load_checkpoint
from fpdm.config import Config, from_dict
from fpdm.errors import UsageError
from fpdm.registry import default_registry

from fpdm.apps.presets import default_run
from fpdm.apps.sampling_setup import add_process_arguments, names, sampling_parts


def export_command(parser: argparse.ArgumentParser):  # type: ignore[no-untyped-def]
    parser.add_argument("checkpoint", nargs="?",
                        help="a run or checkpoint folder (default: the run `fpdm train` writes)")
    parser.add_argument("--onnx", dest="format", action="store_const", const="onnx",
                        help="ONNX (the built-in format; same as --format onnx)")
    parser.add_argument("--format", dest="format", help="a registered exporter (see `fpdm plugins`)")
    parser.add_argument("--iters", type=int, default=3, help="fixed-point iterations unrolled per step (K)")
    parser.add_argument("--solver", help="solver to unroll (default: the config's)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default 20)")
    parser.add_argument("--fp16", action="store_true", help="half-precision weights and compute (I/O stays fp32)")
    parser.add_argument("--no-verify", action="store_true", help="skip the parity check against PyTorch")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    parser.add_argument("--out", help="output .onnx path (default: RUN/export/<name>.onnx)")
    parser.add_argument("--whole-loop", action="store_true", help="export all --steps steps in one graph")
    add_process_arguments(parser, steps=None)

    def run(args: argparse.Namespace) -> int:
        if args.format is None:
            raise UsageError("choose a format: --onnx (or --format NAME of a registered exporter)")
        if args.iters < 1:
            raise UsageError(f"--iters must be >= 1, got {args.iters}")
        if args.whole_loop and args.steps is None:
            raise UsageError("--whole-loop needs --steps S")
        if not args.whole_loop and (args.steps is not None or args.budget is not None):
            raise UsageError("--steps and --budget only apply with --whole-loop; a step graph runs --iters per call")
        ckpt = load_checkpoint(default_run(args.checkpoint))
        config = from_dict(Config, ckpt.config)
        registry = default_registry()
        model = load_denoiser(ckpt, ema=args.ema, registry=registry)
        solver_name = args.solver or config.solver.name
        solver_options = {} if args.solver else dict(config.solver.options)
        solver = registry.create("solver", solver_name, **solver_options)
        options: dict[str, Any] = {"iters": args.iters, "fp16": args.fp16, "verify": not args.no_verify}
        if args.opset is not None:
            options["opset"] = args.opset
        exporter = registry.create("exporter", args.format, **options)
        loop = _loop_spec(args, config, model, registry, ckpt.spec) if args.whole_loop else None
        out = Path(args.out) if args.out else _default_out(ckpt.path, args, model)
        if out.suffix != ".onnx":
            raise UsageError(f"--out must end in .onnx, got {out}")
        report = exporter.export(model, solver=solver, solver_info={"name": solver_name, "options": solver_options},
                                 config=ckpt.config, spec=ckpt.spec, out=out, loop=loop,
                                 source={"checkpoint": str(ckpt.path), "step": ckpt.step, "ema": args.ema})
        _print(report)
        return 0

    return run


def _loop_spec(args: argparse.Namespace, config: Config, model: Any, registry: Any, spec: dict[str, Any]) -> Any:
    from fpdm.export.exporter import LoopSpec

    parts = sampling_parts(args, config, model, registry, iters=args.iters)
    if parts.allocator.tol > 0:
        raise UsageError(f"allocator {args.allocator!r} decides per sample at run time; a graph needs a fixed plan "
                         "(uniform, increasing, decreasing, ramp)")
    return LoopSpec(parts.diffusion, parts.update, parts.iterations, parts.reuse, args.cfg_scale, args.cfg_channels,
                    args.clip_x0, "latent" not in spec, names(args))


def _default_out(ckpt_path: Path, args: argparse.Namespace, model: Any) -> Path:
    run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    what = f"loop-s{args.steps}" if args.whole_loop else f"k{args.iters}"
    return run / "export" / f"{ckpt_path.name}-{what}{'-fp16' if args.fp16 else ''}.onnx"


def _print(report: dict[str, Any]) -> None:
    size = report["bytes"] / 2**20
    print(f"wrote {report['path']} ({report['kind']}, {report['precision']}, opset {report['opset']}, "
          f"{size:.1f} MiB, iterations {json.dumps(report['iters'])})")
    print(f"inputs {', '.join(report['inputs'])}; outputs {', '.join(report['outputs'])}")
    if report["parity"]:
        for batch, errors in report["parity"].items():
            shown = ", ".join(f"{k} {e:.1e}" for k, e in errors.items())
            print(f"parity vs PyTorch at batch {batch}: max relative error {shown} (bound {report['tolerance']:.0e})")
    else:
        print("parity not checked (--no-verify)")
