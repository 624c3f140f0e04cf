"""`fpdm.evaluate`: FID, KID and precision/recall of samples against a reference, computed by torch-fidelity.

The samples are a folder of images, an image tensor, or a model (a `Pipeline`, or the path of a run, checkpoint
or packed folder) that is sampled first. Features come from Inception-v3 when its weights are on this machine,
or from fpdm's own Fashion-MNIST CNN (shipped with fpdm, sha256-checked). The result always names the extractor,
both sample counts and the reference; a metric on the CNN's features is "FID (fpdm-fmnist-cnn features)",
never Inception FID. Both sides are converted as training converts images (`fpdm.eval.inputs`). Every cheap
check (options, counts against the extractor's feature size, paths, the extractor choice) runs before a model
is loaded or sampled and before an extractor is retrained (`check_inputs`), and the shapes are checked before
sampling. Nothing is trained unless asked (`train_fmnist_extractor`, `fpdm eval --train-extractor`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from torch import Tensor

from fpdm.config import EvalConfig, make_config
from fpdm.errors import UsageError
from fpdm.eval.features import DEFAULT_FEATURES, cache_path, train_extractor
from fpdm.eval.fidelity import (
    CNN_NAME,
    INCEPTION,
    Extractor,
    check_pair,
    cnn_extractor,
    compute_metrics,
    inception_extractor,
    inception_weights,
)
from fpdm.eval.inputs import (
    N_HINT,
    ImageSet,
    ModelSamples,
    check_sources,
    from_tensor,
    is_fashion_mnist,
    is_model_path,
    load_folder,
    load_model,
    load_reference,
    sample_images,
)
from fpdm.io.checkpoint import sha256_file

if TYPE_CHECKING:
    from fpdm.config import SampleConfig
    from fpdm.models.vae import AutoencoderKL
    from fpdm.pipeline import Pipeline

Log = Callable[[str], None]
NO_INCEPTION = (
    "Inception-v3 weights are not on this machine and fpdm never downloads them: pass "
    "--inception-weights PATH, or use --extractor fpdm-fmnist-cnn for gray 32x32 images"
)


@dataclasses.dataclass(frozen=True)
class ImagesInfo:
    """One side of the comparison, without its pixels."""

    n: int
    shape: tuple[int, int, int]  # (C, H, W)
    source: str
    details: dict[str, Any]

    def describe(self) -> str:
        c, h, w = self.shape
        return f"{self.n} images {'gray' if c == 1 else 'RGB'} {w}x{h} from {self.source}"


@dataclasses.dataclass(frozen=True)
class ExtractorInfo:
    name: str  # "fpdm-fmnist-cnn" or "inception-v3"
    sha256: str  # of the weights file: names the exact extractor
    description: str
    features: int
    weights: str
    test_accuracy: float | None  # the CNN's, on Fashion-MNIST test

    @property
    def metric_suffix(self) -> str:
        return "Inception-v3 features" if self.name == INCEPTION else f"{self.name} features"


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """The metrics and what they were computed on. `precision`/`recall` are None when they were skipped."""

    fid: float
    kid_mean: float
    kid_std: float
    kid_subset_size: int
    precision: float | None
    recall: float | None
    extractor: ExtractorInfo
    samples: ImagesInfo
    reference: ImagesInfo

    @property
    def n(self) -> int:
        return self.samples.n

    def lines(self) -> list[str]:
        """The human-readable report."""
        suffix = self.extractor.metric_suffix
        lines = [
            f"samples:   {self.samples.describe()}",
            f"reference: {self.reference.describe()}",
            f"features:  {self.extractor.description}, {self.extractor.features}-d; metrics by torch-fidelity",
            f"FID ({suffix}): {self.fid:.4f}  [{self.samples.n} samples vs {self.reference.n} reference images]",
            f"KID ({suffix}): {self.kid_mean:.5f} +- {self.kid_std:.5f}  [100 subsets of {self.kid_subset_size}]",
        ]
        if self.precision is not None:
            lines.append(f"precision / recall ({suffix}, k=3): {self.precision:.4f} / {self.recall:.4f}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: metrics (also under their full names), extractor, both sides, and the text lines."""
        suffix = self.extractor.metric_suffix
        metrics: dict[str, Any] = {
            f"FID ({suffix})": self.fid,
            f"KID ({suffix})": self.kid_mean,
            "fid": self.fid,
            "kid_mean": self.kid_mean,
            "kid_std": self.kid_std,
            "kid_subset_size": self.kid_subset_size,
        }
        if self.precision is not None:
            metrics.update(precision=self.precision, recall=self.recall)
        ex = self.extractor
        extractor = {
            "name": ex.name,
            "description": ex.description,
            "features": ex.features,
            "weights": ex.weights,
            "sha256": ex.sha256,
            **({} if ex.test_accuracy is None else {"test_accuracy": ex.test_accuracy}),
        }
        sides = {
            key: {"n": side.n, "shape": list(side.shape), "source": side.source, **side.details}
            for key, side in (("samples", self.samples), ("reference", self.reference))
        }
        return {"metrics": metrics, "extractor": extractor, **sides, "lines": self.lines()}


def evaluate(
    samples: str | Path | Tensor | Pipeline,
    *,
    config: EvalConfig | None = None,
    ref: str = "fashion_mnist",
    ref_split: str = "test",
    ref_n: int | None = None,
    data_dir: str | None = None,
    extractor: str = "auto",
    inception_weights: str | None = None,
    cache: str | None = None,
    prc: bool = True,
    kid_subset_size: int = 1000,
    n: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    weights: str = "ema",
    sample: SampleConfig | None = None,
    vae: str | Path | AutoencoderKL | None = None,
    progress: bool = True,
    log: Log | None = None,
) -> EvalResult:
    """Score `samples` against `ref` with torch-fidelity's FID, KID and (with `prc`) precision/recall.

    `samples`: a folder of images (flat or in class subfolders, or an `fpdm sample` output folder), float images
    (N, C, H, W) in [-1, 1], a `Pipeline`, or the path of a run / checkpoint / packed folder; a model draws `n`
    samples (required), every class in turn, with the sampling options of `sample` (the model's defaults where
    None), and a latent model's samples are decoded by `vae` (a diffusers AutoencoderKL folder or a loaded one;
    default: the VAE the run recorded). Both sides are converted as training converts images, to the samples'
    size and channels. The options are `EvalConfig`'s fields: `config` gives them all at once, and a keyword that
    differs from its default overrides the config's value. `log` receives status lines (only with `progress`)
    and notes such as skipped unreadable files (always); default: stderr."""
    options = _options(
        config,
        ref=ref,
        ref_split=ref_split,
        ref_n=ref_n,
        data_dir=data_dir,
        extractor=extractor,
        inception_weights=inception_weights,
        cache=cache,
        prc=prc,
        kid_subset_size=kid_subset_size,
        n=n,
        batch_size=batch_size,
        seed=seed,
        device=device,
        weights=weights,
    )
    note = log or (lambda line: print(line, file=sys.stderr, flush=True))
    check_sources(samples, ref=options.ref, n=options.n, vae=vae)
    chosen = _extractor(options)  # the CNN is small: loading it here also checks its sha256 before anything else
    _check_counts(options, chosen.kind, chosen.features)
    side = _samples(samples, options, vae=vae, log=note)  # the images, or the model still to sample
    channels, size, _ = side.shape if isinstance(side, ModelSamples) else side.images.shape[1:]
    _check_channels(options, channels)
    if isinstance(side, ImageSet):
        _check_count(side.images.shape[0], "the number of samples is", kind=chosen.kind, features=chosen.features)
    reference = load_reference(
        options.ref,
        split=options.ref_split,
        data_dir=options.data_dir,
        limit=options.ref_n,
        seed=options.seed,
        size=size,
        channels=channels,
        log=note,
    )
    if isinstance(side, ImageSet):
        images = side
    else:
        images = _sample(side, reference, chosen, options, sample=sample, log=note if progress else None)
    metrics = compute_metrics(
        images.images,
        reference.images,
        extractor=chosen,
        seed=options.seed,
        prc=options.prc,
        kid_subset_size=options.kid_subset_size,
        device=None if options.device == "auto" else options.device,
    )
    return EvalResult(
        metrics["fid"],
        metrics["kid_mean"],
        metrics["kid_std"],
        metrics["kid_subset_size"],
        metrics.get("precision"),
        metrics.get("recall"),
        _extractor_info(chosen),
        _info(images),
        _info(reference),
    )


def _sample(
    model: ModelSamples,
    reference: ImageSet,
    extractor: Extractor,
    options: EvalConfig,
    *,
    sample: SampleConfig | None,
    log: Log | None,
) -> ImageSet:
    """The model's `n` samples, once the shape they will have is known to fit the reference (`log` None: quiet)."""
    shape = (options.n or 0, *model.shape)
    planned = reference.images.new_zeros(1, *shape[1:]).expand(*shape)  # no memory: only its shape counts
    check_pair(planned, reference.images, extractor=extractor)
    return sample_images(
        model.pipeline,
        n=options.n or 0,
        batch_size=options.batch_size,
        seed=options.seed,
        sample=sample,
        vae=model.vae,
        vae_source=model.vae_source,
        progress=log is not None,
        log=log or (lambda line: None),
    )


def check_inputs(
    samples: str | Path | Tensor | Pipeline,
    *,
    config: EvalConfig | None = None,
    vae: str | Path | AutoencoderKL | None = None,
    retrain: bool = False,
) -> None:
    """The cheap checks `evaluate` runs before it loads, samples or trains anything (options, counts against
    the extractor's feature size, paths, the extractor choice): a one-line `UsageError` for the first problem.
    `retrain`: the CNN extractor is about to be retrained into `config.cache` (`fpdm eval --train-extractor`),
    so its file is not read yet."""
    options = config or EvalConfig()
    check_sources(samples, ref=options.ref, n=options.n, vae=vae)
    if retrain:
        _check_counts(options, CNN_NAME, DEFAULT_FEATURES)
    else:
        chosen = _extractor(options)
        _check_counts(options, chosen.kind, chosen.features)


def train_fmnist_extractor(cache: str | None = None, *, log: Log | None = None) -> Extractor:
    """Retrain fpdm's Fashion-MNIST CNN extractor into the cache (default ~/.cache/fpdm): a few CPU minutes.
    The default extractor stays the shipped one: evaluate with this one through `cache` or its path."""
    say = log or (lambda line: None)
    path = cache_path(cache)
    say(f"training the {CNN_NAME} feature extractor on Fashion-MNIST train (CPU, a few minutes; cached at {path})")
    train_extractor(path, log=say)
    return cnn_extractor(path)


def _options(config: EvalConfig | None, **keywords: Any) -> EvalConfig:
    """`config` (or the defaults) with every keyword that differs from its default applied on top."""
    defaults = EvalConfig()
    changes = {key: value for key, value in keywords.items() if not _same(value, getattr(defaults, key))}
    return make_config(EvalConfig, **{**attrs.asdict(config or defaults, recurse=False), **changes})


def _same(value: Any, default: Any) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def _check_counts(options: EvalConfig, kind: str, features: int) -> None:
    """`ref_n` and `n` against the extractor's feature size, before any image is read."""
    for flag, value in (("ref_n (--ref-n) is", options.ref_n), ("n (--n) is", options.n)):
        if value is not None:
            _check_count(value, flag, kind=kind, features=features)


def _check_count(count: int, what: str, *, kind: str, features: int) -> None:
    """One wording for every count below what FID's covariance needs (`fpdm eval`'s own check says it too)."""
    if count <= features:
        raise UsageError(
            f"{what} {count}; FID with {kind} features ({features}-d) needs at least {features + 1} images for a "
            f"full-rank covariance ({N_HINT})"
        )


def _samples(samples: Any, options: EvalConfig, *, vae: Any, log: Log) -> ImageSet | ModelSamples:
    """Folders and tensors become images now; a model is loaded (with its VAE, for a latent model) to be sampled
    once the reference is known to fit."""
    if isinstance(samples, Tensor):
        return from_tensor(samples)
    if isinstance(samples, (str, Path)) and not is_model_path(Path(samples).expanduser()):
        return load_folder(samples, log=log)
    return load_model(_load_pipeline(samples, options), vae=vae)


def _load_pipeline(model: Any, options: EvalConfig) -> Pipeline:
    if not isinstance(model, (str, Path)):
        return model
    from fpdm.pipeline import load

    return load(model, device=options.device, weights=options.weights)


def _check_channels(options: EvalConfig, channels: int) -> None:
    """auto picks fpdm's gray CNN when no Inception weights are here, which suits Fashion-MNIST and gray images only."""
    if (
        options.extractor == "auto"
        and channels == 3
        and _choice(options) == CNN_NAME
        and not is_fashion_mnist(options.ref)
    ):
        raise UsageError(f"the images are RGB: {NO_INCEPTION}")


def _choice(options: EvalConfig) -> str:
    """auto -> fpdm's CNN for Fashion-MNIST and wherever no Inception weights are here, Inception-v3 otherwise;
    other choices stay as they are."""
    if options.extractor != "auto":
        return options.extractor
    if is_fashion_mnist(options.ref) or inception_weights(options.inception_weights) is None:
        return CNN_NAME
    return INCEPTION


def _extractor(options: EvalConfig) -> Extractor:
    """The extractor `options` choose, refused in one line when it is not here (nothing is ever downloaded)."""
    choice = _choice(options)
    if choice == INCEPTION:
        weights = inception_weights(options.inception_weights)
        if weights is None:
            raise UsageError(NO_INCEPTION)
        return inception_extractor(weights)
    if choice == CNN_NAME:
        return _default_cnn(options)
    if not Path(choice).expanduser().is_file():
        raise UsageError(f"--extractor {choice!r}: expected auto, {CNN_NAME}, {INCEPTION} or an extractor file path")
    return cnn_extractor(choice)


def _default_cnn(options: EvalConfig) -> Extractor:
    """The shipped CNN, the same file (and so the same FIDs) on every machine; with `cache`, the one retrained
    into that folder (`fpdm eval --train-extractor --cache DIR`)."""
    return cnn_extractor(None if options.cache is None else cache_path(options.cache))


def _extractor_info(extractor: Extractor) -> ExtractorInfo:
    cnn = extractor.cnn
    return ExtractorInfo(
        extractor.kind,
        cnn.sha256 if cnn is not None else sha256_file(extractor.weights),
        extractor.description,
        extractor.features,
        str(extractor.weights),
        None if cnn is None else cnn.test_accuracy,
    )


def _info(images: ImageSet) -> ImagesInfo:
    n, c, h, w = images.images.shape
    return ImagesInfo(n, (c, h, w), images.source, dict(images.details))
