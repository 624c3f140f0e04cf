"""`fpdm pack MODEL --out DIR`: a run or checkpoint folder -> a packed model folder to share (model.safetensors,
config.toml with hashes, README.md model card), the same as `fpdm.load(MODEL).save_pretrained(DIR)`.
Top-level imports stay torch-free."""

from __future__ import annotations

import argparse
import shlex

from fpdm.apps.cli import Handler, add_json_option, add_model_argument, add_weights_option, write_json


def pack_command(parser: argparse.ArgumentParser) -> Handler:
    add_model_argument(parser, help="a run or checkpoint folder (default: the run `fpdm train` writes)")
    parser.add_argument("--out", required=True, help="the packed folder to write (replaced if it is one already)")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="dtype the weights are stored in (loading computes in fp32 unless asked otherwise)",
    )
    add_weights_option(parser, help="which weights to pack: the EMA or the raw (trained) ones")
    add_json_option(parser, help="also write what was packed to PATH; '-': stdout, instead of the summary")

    def run(args: argparse.Namespace) -> int:
        from fpdm.apps.presets import default_run
        from fpdm.pipeline import load

        model = default_run(args.model)
        pipe = load(model, device="cpu", weights=args.weights)
        command = shlex.join(
            ["fpdm", "pack", model, "--out", args.out, "--dtype", args.dtype, "--weights", args.weights]
        )
        out = pipe.save_pretrained(args.out, dtype=args.dtype, weights=args.weights, command=command)
        files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
        report = {
            "path": str(out),
            "source": str(pipe.path),
            "step": pipe.step,
            "weights": args.weights,
            "dtype": args.dtype,
            "files": files,
        }
        if args.json is not None:
            write_json(report, args.json)
        if args.json != "-":
            sizes = ", ".join(f"{name} {size / 2**20:.2f} MiB" for name, size in files.items())
            print(f"packed {pipe.path} (step {pipe.step}, {args.weights} weights, {args.dtype}) into {out}: {sizes}")
            print(f"load it with fpdm.load({str(out)!r}) or `fpdm sample {out}`")
        return 0

    return run
