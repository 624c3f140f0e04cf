"""`fpdm eval SAMPLES_OR_MODEL --ref DATASET`: flags -> EvalConfig (+ SampleConfig) -> `fpdm.evaluate` -> report.

The metrics, the extractor choice and the sampling all live in `fpdm.eval.evaluation`; this module only reads
flags and prints. Its top-level imports stay torch-free (`fpdm eval --help` must not load torch).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from fpdm.apps.cli import add_device_option, add_json_option, add_weights_option, write_json
from fpdm.apps.sampling_setup import add_process_arguments, sample_config
from fpdm.errors import UsageError

if TYPE_CHECKING:
    from fpdm.config import EvalConfig

Handler = Callable[[argparse.Namespace], int]
COUNTS = ("n", "batch_size", "ref_n", "kid_subset_size")
CNN_NAME = "fpdm-fmnist-cnn"
# The feature sizes of the extractors fpdm names (the shipped CNN's, torch-fidelity's Inception-v3), here so that
# counts FID cannot work with are refused before torch is imported; tests/test_eval.py keeps them equal to fpdm.eval's.
NAMED_FEATURES = {CNN_NAME: 128, "inception-v3": 2048}
N_HINT = "FID needs about 1000 samples or more"


def eval_command(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument(
        "input",
        nargs="?",
        help="a folder of images (flat or in class subfolders, or an `fpdm sample` output folder), "
        "or a run, checkpoint or packed model folder to sample from first",
    )
    parser.add_argument(
        "--ref",
        default="fashion_mnist",
        metavar="NAME|DIR",
        help="fashion_mnist or a folder of images (flat or in class subfolders)",
    )
    parser.add_argument(
        "--ref-split", default="test", choices=("test", "train"), help="Fashion-MNIST split to compare against"
    )
    parser.add_argument(
        "--ref-n", type=int, metavar="N", help="use a seeded random subset of this many reference images"
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", help="Fashion-MNIST IDX folder (default: /usr/share/datasets/fashion-mnist)"
    )
    parser.add_argument(
        "--extractor",
        default="auto",
        metavar="NAME|FILE",
        help="auto, fpdm-fmnist-cnn, inception-v3, or the path of an fpdm-fmnist-cnn .safetensors "
        "file (auto: the CNN for Fashion-MNIST and gray images, Inception-v3 otherwise)",
    )
    parser.add_argument(
        "--inception-weights",
        metavar="FILE",
        help="local torch-fidelity Inception-v3 weights (weights-inception-2015-12-05-6726825d.pth); never downloaded",
    )
    parser.add_argument(
        "--cache",
        metavar="DIR",
        help="use the fpdm-fmnist-cnn retrained into DIR instead of the one shipped with fpdm "
        "(--train-extractor writes to DIR, default ~/.cache/fpdm)",
    )
    parser.add_argument(
        "--train-extractor",
        action="store_true",
        help="retrain the fpdm-fmnist-cnn extractor into --cache and evaluate with it; without INPUT, only train",
    )
    add_json_option(parser, help="write the JSON report to PATH; '-': to stdout, instead of the text report")
    parser.add_argument("--no-prc", action="store_true", help="skip precision/recall (k-NN, quadratic in N)")
    parser.add_argument(
        "--kid-subset-size", type=int, default=1000, metavar="N", help="capped at the smaller set's size"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    sampling = parser.add_argument_group("sampling (when INPUT is a model)")
    sampling.add_argument(
        "--n",
        type=int,
        metavar="N",
        help="number of samples to draw; required for a model (FID needs about 1000 or more)",
    )
    sampling.add_argument("--batch-size", type=int, default=64, metavar="N", help="samples drawn at once")
    add_process_arguments(sampling)
    sampling.add_argument(
        "--iters",
        type=int,
        metavar="K",
        help="fixed-point iterations per step without --budget (default: the model's configured solver.max_iter)",
    )
    sampling.add_argument("--solver", metavar="NAME", help="fixed-point solver (default: the model's configured one)")
    sampling.add_argument("--tol", type=float, default=0.0, help="stop a sample's solve early below this residual")
    sampling.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seeds sampling, the reference subset and KID"
    )
    sampling.add_argument(
        "--vae",
        metavar="DIR",
        help="latent models: the diffusers AutoencoderKL folder that decodes the samples (default: the VAE the run "
        "recorded)",
    )
    add_weights_option(sampling)
    add_device_option(sampling)

    def run(args: argparse.Namespace) -> int:
        _check_flags(args)  # cheap checks first, torch-free: nothing is imported, loaded, sampled or trained yet
        config, sample = _eval_config(args), sample_config(args)
        to_stdout = args.json == "-"  # stdout holds the report (or the JSON alone); status lines go to stderr
        log = _printer(sys.stderr)
        if args.train_extractor:
            import attrs

            from fpdm.eval.evaluation import check_inputs, train_fmnist_extractor

            if args.input is not None:  # the evaluation's own checks, before minutes of training
                check_inputs(args.input, config=config, vae=args.vae, retrain=True)
            trained = train_fmnist_extractor(args.cache, log=log)
            if args.input is None:
                return 0
            config = attrs.evolve(config, extractor=CNN_NAME, cache=str(trained.weights.parent))  # this one
        from fpdm.eval.evaluation import evaluate

        result = evaluate(
            args.input,
            config=config,
            sample=sample,
            vae=args.vae,
            progress=not args.no_progress,
            log=log,
        )
        if not to_stdout:
            print("\n".join(result.lines()))
        if args.json is not None:
            write_json(result.to_dict(), args.json)
        return 0

    return run


def _check_flags(args: argparse.Namespace) -> None:
    """Flag values, flag combinations and counts FID cannot work with, checked without importing torch: `fpdm eval
    --ref-n 5` is refused at once. `fpdm.eval.evaluation` repeats the count check with the extractor it loads."""
    for name in COUNTS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.train_extractor and args.extractor not in ("auto", CNN_NAME):
        raise UsageError(
            f"--train-extractor retrains {CNN_NAME} and evaluates with it; drop --extractor {args.extractor}"
        )
    named = args.extractor in ("auto", *NAMED_FEATURES) and (args.cache is None or args.train_extractor)
    if named:  # an extractor file's feature size is read from the file, after the imports
        kind = CNN_NAME if args.extractor == "auto" else args.extractor  # auto: the CNN or the larger Inception
        features = NAMED_FEATURES[kind]
        for flag, value in (("ref_n (--ref-n)", args.ref_n), ("n (--n)", args.n)):
            if value is not None and value <= features:
                raise UsageError(
                    f"{flag} is {value}; FID with {kind} features ({features}-d) needs at least {features + 1} "
                    f"images for a full-rank covariance ({N_HINT})"
                )
    if args.input is None and not args.train_extractor:
        raise UsageError("give a folder of images or a model to evaluate (or --train-extractor alone)")


def _printer(stream: TextIO) -> Callable[[str], None]:
    def say(line: str) -> None:
        print(line, file=stream, flush=True)

    return say


def _eval_config(args: argparse.Namespace) -> EvalConfig:
    from fpdm.config import EvalConfig, make_config

    return make_config(
        EvalConfig,
        ref=args.ref,
        ref_split=args.ref_split,
        ref_n=args.ref_n,
        data_dir=args.data_dir,
        extractor=args.extractor,
        inception_weights=args.inception_weights,
        cache=args.cache,
        prc=not args.no_prc,
        kid_subset_size=args.kid_subset_size,
        n=args.n,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        weights=args.weights,
    )
