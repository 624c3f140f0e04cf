"""`fpdm eval SAMPLES_OR_CKPT --ref DATASET`: FID, KID and precision/recall computed by torch-fidelity.

Features come from Inception-v3 when its weights are on this machine, or from fpdm's own Fashion-MNIST CNN
(trained on first use, cached). The report always names the extractor, both sample counts and the reference
split; a metric on the CNN's features is called "FID (fpdm-fmnist-cnn features)", never Inception FID.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fpdm.errors import UsageError
from fpdm.eval.features import default_path, train_extractor
from fpdm.eval.fidelity import CNN_NAME, INCEPTION, Extractor, cnn_extractor, compute_metrics, inception_extractor, inception_weights

from fpdm.apps.eval_inputs import FASHION_MNIST_NAMES, ImageSet, load_folder, load_reference, sample_checkpoint
from fpdm.apps.sampling_setup import add_process_arguments


def eval_command(parser: argparse.ArgumentParser):  # type: ignore[no-untyped-def]
    parser.add_argument("input", nargs="?", help="a folder of PNGs (or an `fpdm sample` output folder), "
                        "or a run/checkpoint to sample from first")
    parser.add_argument("--ref", default="fashion_mnist", help="fashion_mnist or a folder of images")
    parser.add_argument("--ref-split", default="test", choices=("test", "train"),
                        help="Fashion-MNIST split to compare against (default: test)")
    parser.add_argument("--ref-n", type=int, help="use a seeded random subset of this many reference images")
    parser.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--extractor", default="auto", help="auto, fpdm-fmnist-cnn, inception-v3, or the path "
                        "of an fpdm-fmnist-cnn .safetensors file (auto: the CNN for Fashion-MNIST and gray images, "
                        "Inception-v3 otherwise)")
    parser.add_argument("--inception-weights", help="local torch-fidelity Inception-v3 weights "
                        "(weights-inception-2015-12-05-6726825d.pth); never downloaded")
    parser.add_argument("--cache", help="where the fpdm-fmnist-cnn extractor is cached (default: ~/.cache/fpdm)")
    parser.add_argument("--train-extractor", action="store_true",
                        help="(re)train the fpdm-fmnist-cnn extractor into the cache; without INPUT, only that")
    parser.add_argument("--json", dest="json_path", help="also write the report as JSON here")
    parser.add_argument("--no-prc", action="store_true", help="skip precision/recall (k-NN, quadratic in N)")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="capped at the smaller set's size")
    sampling = parser.add_argument_group("sampling (when INPUT is a checkpoint)")
    sampling.add_argument("--n", type=int, default=1000, help="number of samples to draw")
    sampling.add_argument("--batch-size", type=int, default=250)
    add_process_arguments(sampling)
    sampling.add_argument("--iters", type=int, help="fixed-point iterations per step without --budget")
    sampling.add_argument("--solver", help="fixed-point solver (default: the config's)")
    sampling.add_argument("--tol", type=float, default=0.0)
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    sampling.add_argument("--device", default="auto")

    def run(args: argparse.Namespace) -> int:
        for name in ("n", "batch_size", "ref_n", "kid_subset_size"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if args.train_extractor:
            _train(default_path(args.cache))
            if args.input is None:
                return 0
        if args.input is None:
            raise UsageError("give a folder of images or a checkpoint to evaluate (or --train-extractor alone)")
        samples = _samples(args)
        reference = load_reference(args.ref, split=args.ref_split, data_dir=args.data_dir, limit=args.ref_n,
                                   seed=args.seed)
        extractor = _extractor(args, samples, reference)
        metrics = compute_metrics(samples.images, reference.images, extractor=extractor, seed=args.seed,
                                  prc=not args.no_prc, kid_subset_size=args.kid_subset_size,
                                  device=None if args.device == "auto" else args.device)
        report = _report(samples, reference, extractor, metrics)
        print("\n".join(report["lines"]))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
        return 0

    return run


def _train(path: Path) -> Extractor:
    print(f"training the {CNN_NAME} feature extractor on Fashion-MNIST train (CPU, a few minutes; cached at {path})",
          flush=True)
    train_extractor(path, log=lambda line: print(line, flush=True))
    return cnn_extractor(path)


def _samples(args: argparse.Namespace) -> ImageSet:
    path = Path(args.input).expanduser()
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if (path / "checkpoints").is_dir() or (path / "meta.json").is_file() or not path.is_dir():
        return sample_checkpoint(args)  # a run folder (its loss.png is no sample), a checkpoint, or a file
    return load_folder(path)


def _extractor(args: argparse.Namespace, samples: ImageSet, reference: ImageSet) -> Extractor:
    choice = args.extractor
    if choice == "auto":
        fmnist = args.ref.lower() in FASHION_MNIST_NAMES
        local = None if fmnist else inception_weights(args.inception_weights)
        if fmnist or (local is None and samples.images.shape[1] == 1):
            choice = CNN_NAME
        else:
            choice = INCEPTION
    if choice == INCEPTION:
        weights = inception_weights(args.inception_weights)
        if weights is None:
            raise UsageError("Inception-v3 weights are not on this machine and fpdm never downloads them: pass "
                             "--inception-weights PATH, or use --extractor fpdm-fmnist-cnn for gray 32x32 images")
        return inception_extractor(weights)
    if choice == CNN_NAME:
        path = default_path(args.cache)
        if not path.is_file():
            print(f"no {CNN_NAME} extractor at {path}: training it now (first use)", flush=True)
            return _train(path)
        return cnn_extractor(path)
    if Path(choice).expanduser().is_file():
        return cnn_extractor(choice)
    raise UsageError(f"--extractor {choice!r}: expected auto, {CNN_NAME}, {INCEPTION} or an extractor file path")


def _report(samples: ImageSet, reference: ImageSet, extractor: Extractor, metrics: dict[str, Any]) -> dict[str, Any]:
    suffix = extractor.metric_suffix
    n1, n2 = samples.images.shape[0], reference.images.shape[0]
    lines = [f"samples:   {samples.describe()}", f"reference: {reference.describe()}",
             f"features:  {extractor.description}, {extractor.features}-d; metrics by torch-fidelity",
             f"FID ({suffix}): {metrics['fid']:.4f}  [{n1} samples vs {n2} reference images]",
             f"KID ({suffix}): {metrics['kid_mean']:.5f} +- {metrics['kid_std']:.5f}  "
             f"[100 subsets of {metrics['kid_subset_size']}]"]
    if "precision" in metrics:
        lines.append(f"precision / recall ({suffix}, k=3): {metrics['precision']:.4f} / {metrics['recall']:.4f}")
    return {
        "metrics": {f"FID ({suffix})": metrics["fid"], f"KID ({suffix})": metrics["kid_mean"], **metrics},
        "extractor": {"name": extractor.kind, "description": extractor.description, "features": extractor.features,
                      "weights": str(extractor.weights),
                      **({} if extractor.cnn is None else {"test_accuracy": extractor.cnn.test_accuracy,
                                                           "sha256": extractor.cnn.sha256})},
        "samples": {"n": n1, "shape": list(samples.images.shape[1:]), "source": samples.source, **samples.details},
        "reference": {"n": n2, "shape": list(reference.images.shape[1:]), "source": reference.source,
                      **reference.details},
        "lines": lines,
    }
