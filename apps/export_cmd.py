"""`fpdm export MODEL --onnx [--iters K]`: flags -> `ExportConfig` -> `fpdm.exporting.export_report`, the function
`Pipeline.export` runs (the exporter registered as --format, one denoising step or the whole loop, verified).
Top-level imports stay torch-free."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fpdm.apps.cli import Handler, add_json_option, add_model_argument, add_weights_option, write_json
from fpdm.apps.sampling_setup import add_process_arguments
from fpdm.errors import UsageError


def export_command(parser: argparse.ArgumentParser) -> Handler:
    add_model_argument(parser)
    parser.add_argument(
        "--onnx",
        dest="format",
        action="store_const",
        const="onnx",
        help="ONNX (the built-in format; same as --format onnx)",
    )
    parser.add_argument("--format", dest="format", help="a registered exporter (see `fpdm plugins`)")
    parser.add_argument(
        "--iters",
        type=int,
        help="fixed-point iterations unrolled per step, K (default: the model's configured solver.max_iter)",
    )
    parser.add_argument("--solver", help="solver to unroll (default: the model's configured one)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's, 20 for onnx)")
    parser.add_argument("--fp16", action="store_true", help="half-precision weights and compute (I/O stays fp32)")
    parser.add_argument("--no-verify", action="store_true", help="skip the parity check against PyTorch")
    add_weights_option(parser)
    parser.add_argument(
        "--out",
        help="output .onnx path (default: RUN/export/<checkpoint>-k<K>.onnx, or DIR-export/ beside a packed folder)",
    )
    parser.add_argument("--whole-loop", action="store_true", help="export all --steps steps in one graph")
    add_process_arguments(parser, steps=None, steps_help="sampling steps of a --whole-loop graph (required there)")
    add_json_option(parser, help="also write the export report to PATH; '-': stdout, instead of the summary")

    def run(args: argparse.Namespace) -> int:
        from fpdm.apps.presets import default_run
        from fpdm.config import ExportConfig, make_config
        from fpdm.exporting import export_report
        from fpdm.pipeline import load

        if args.format is None:
            raise UsageError("choose a format: --onnx (or --format NAME of a registered exporter)")
        config = make_config(
            ExportConfig,
            format=args.format,
            iters=args.iters,
            solver=args.solver,
            opset=args.opset,
            fp16=args.fp16,
            verify=not args.no_verify,
            out=args.out,
            whole_loop=args.whole_loop,
            steps=args.steps,
            spacing=args.spacing,
            budget=args.budget,
            sampler=args.sampler,
            eta=args.eta,
            allocator=args.allocator,
            reuse=args.reuse,
            cfg_scale=args.cfg_scale,
            cfg_channels=args.cfg_channels,
            guidance_rescale=args.guidance_rescale,
            clip_x0=args.clip_x0,
        )
        pipe = load(default_run(args.model), device="cpu", weights=args.weights)
        report = export_report(pipe, config)
        if args.json is not None:
            write_json(report, args.json)
        if args.json != "-":
            _print(report)
        return 0

    return run


def _print(report: dict[str, Any]) -> None:
    size = report["bytes"] / 2**20
    print(
        f"wrote {report['path']} ({report['kind']}, {report['precision']}, opset {report['opset']}, "
        f"{size:.1f} MiB, iterations {json.dumps(report['iters'])})"
    )
    print(f"inputs {', '.join(report['inputs'])}; outputs {', '.join(report['outputs'])}")
    if report["parity"]:
        for batch, errors in report["parity"].items():
            shown = ", ".join(f"{k} {e:.1e}" for k, e in errors.items())
            print(f"parity vs PyTorch at batch {batch}: max relative error {shown} (bound {report['tolerance']:.0e})")
    else:
        print("parity not checked (--no-verify)")
