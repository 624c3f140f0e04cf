"""`fpdm import-official CKPT OUT`: an official FPDM / DiT checkpoint becomes an fpdm run folder."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from fpdm.io.official import import_official
from fpdm.registry import default_registry


def import_official_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("checkpoint", help="a .pt file of the official code: a state dict or {model, ema, args, ...}")
    parser.add_argument("out", help="the fpdm run folder to write (new, empty, or an fpdm run to replace)")
    parser.add_argument("--weights", choices=("ema", "model"),
                        help="write this set as both model and ema weights (default: keep both when present, "
                             "else ema, else model)")
    parser.add_argument("--arch", help="FAMILY-SIZE/PATCH such as FPDM-XL/2, when the file does not tell the heads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the written config, e.g. model.prepost_timestep=true")

    def run(args: argparse.Namespace) -> int:
        result = import_official(args.checkpoint, args.out, weights=args.weights, arch=args.arch,
                                 overrides=args.set, registry=default_registry())
        options = result.spec["options"]
        shape = f"{options['in_channels']}x{options['input_size']}x{options['input_size']}"
        classes = options["num_classes"] or "no"
        print(f"imported {result.arch} (hidden {options['hidden_size']}, {options['num_heads']} heads, "
              f"{result.parameters / 1e6:.2f}M parameters, {classes} classes, latents {shape}), "
              f"weights {result.weights}")
        print(f"checkpoint: {result.checkpoint}")
        return 0

    return run
