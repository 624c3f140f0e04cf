"""`fpdm import-official CKPT OUT`: an official FPDM / DiT checkpoint becomes an fpdm run folder."""

from __future__ import annotations

import argparse
import sys

from fpdm.apps.cli import Handler


def _weights(value: str) -> str:
    """`--weights` value: ema or raw; the old `model` still means raw, with one deprecation line."""
    if value == "model":
        sys.stderr.write("fpdm: --weights model is deprecated; use --weights raw\n")
        return "raw"
    return value


def import_official_command(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("checkpoint", help="a .pt file of the official code: a state dict or {model, ema, args, ...}")
    parser.add_argument(
        "out",
        nargs="?",
        help="the fpdm run folder to write (new, empty, or an fpdm run to replace); or give it as --out",
    )
    parser.add_argument("--out", dest="out_option", metavar="PATH", help="the same as OUT")
    parser.add_argument(
        "--weights",
        type=_weights,
        choices=("ema", "raw"),
        help="write this set as both the raw and the EMA weights (default: keep both when present, else ema, else raw)",
    )
    parser.add_argument("--arch", help="FAMILY-SIZE/PATCH such as FPDM-XL/2, when the file does not tell the heads")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the written config, e.g. model.prepost_timestep=true",
    )

    def run(args: argparse.Namespace) -> int:
        from fpdm.errors import UsageError
        from fpdm.io.official import import_official
        from fpdm.registry import default_registry

        if args.out is not None and args.out_option is not None and args.out != args.out_option:
            raise UsageError(f"two output folders: OUT {args.out} and --out {args.out_option}; give one")
        out = args.out if args.out is not None else args.out_option
        if out is None:
            raise UsageError("no output folder: give OUT (or --out PATH)")
        weights = {"raw": "model"}.get(args.weights, args.weights)  # the official files call the raw set "model"
        result = import_official(
            args.checkpoint, out, weights=weights, arch=args.arch, overrides=args.set, registry=default_registry()
        )
        options = result.spec["options"]
        shape = f"{options['in_channels']}x{options['input_size']}x{options['input_size']}"
        classes = options["num_classes"] or "no"
        print(
            f"imported {result.arch} (hidden {options['hidden_size']}, {options['num_heads']} heads, "
            f"{result.parameters / 1e6:.2f}M parameters, {classes} classes, latents {shape}), "
            f"weights {result.weights}"
        )
        print(f"checkpoint: {result.checkpoint}")
        return 0

    return run
