"""FID, KID and precision/recall through torch-fidelity, with either Inception-v3 or fpdm's own extractor.

The metrics are torch-fidelity's own code (`torch_fidelity.calculate_metrics`); fpdm only hands it two
in-memory uint8 datasets and a feature extractor. fpdm's Fashion-MNIST CNN (fpdm.features) is registered with
torch-fidelity's feature-extractor registry under "fpdm-fmnist-cnn"; its weights file is passed through
torch-fidelity's `feature_extractor_weights_path`. Inception-v3 is used only from a local weights file: this
module never downloads.

torch-fidelity passes extractors uint8 (N, C, H, W) batches; Inception needs 3 channels, so gray images are
repeated to RGB for it, while fpdm's CNN takes gray (or averages RGB).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fpdm.errors import UsageError
from fpdm.eval.features import NAME as CNN_NAME
from fpdm.eval.features import ExtractorFile, load_extractor, load_shipped, to_model_input

INCEPTION = "inception-v3"
INCEPTION_TF_NAME = "inception-v3-compat"  # torch-fidelity's name for the TF-ported FID Inception
INCEPTION_FEATURES = 2048


class UInt8Images(Dataset[Tensor]):
    """Hands torch-fidelity uint8 (C, H, W) items from an in-memory (N, C, H, W) tensor."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def _extractor_class() -> type:
    """The torch-fidelity FeatureExtractorBase subclass wrapping fpdm's CNN (built lazily: torch-fidelity
    imports torchvision, which commands that never evaluate should not pay for)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class FpdmCNNExtractor(FeatureExtractorBase):
        def __init__(
            self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs: Any
        ) -> None:
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise UsageError(f"{CNN_NAME} needs its weights file (feature_extractor_weights_path)")
            self.net = load_extractor(feature_extractor_weights_path).model

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("penultimate", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "logits" if metric == "isc" else "penultimate"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> Tensor:
            return torch.zeros(1, 1, 32, 32, dtype=torch.uint8)

        def forward(self, x: Tensor) -> tuple[Tensor, ...]:
            device = next(self.net.parameters()).device
            h = self.net.embed(to_model_input(x.cpu()).to(device))  # (N, features)
            out = {"penultimate": h * self.net.feature_scale, "logits": self.net.head(torch.relu(h))}  # (N, 10)
            return tuple(out[name] for name in self.features_list)

    return FpdmCNNExtractor


def register() -> None:
    """Register fpdm's CNN with torch-fidelity (once per process)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if CNN_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(CNN_NAME, _extractor_class())


def inception_weights(path: str | None) -> Path | None:
    """The local Inception-v3 FID weights: `path` if given (it must exist), else torch-fidelity's download
    target in the torch hub cache if a file is already there; None when there is none. Never downloads."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UsageError(f"--inception-weights {p} does not exist")
        return p
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)
    return cached if cached.is_file() else None


@dataclasses.dataclass(frozen=True)
class Extractor:
    """What computes the features, named as reports must name it."""

    kind: str  # CNN_NAME or INCEPTION
    weights: Path
    features: int
    description: str  # e.g. "fpdm-fmnist-cnn (test acc 91.2% on 10000 images, sha256 ...)"
    cnn: ExtractorFile | None = None

    @property
    def metric_suffix(self) -> str:
        return "Inception-v3 features" if self.kind == INCEPTION else f"{self.kind} features"


def cnn_extractor(path: str | Path | None = None) -> Extractor:
    """The CNN in the file at `path`; None: the extractor shipped with fpdm, its sha256 checked."""
    loaded = load_shipped() if path is None else load_extractor(path)
    return Extractor(CNN_NAME, loaded.path, loaded.model.features, loaded.describe(), loaded)


def inception_extractor(path: Path) -> Extractor:
    return Extractor(INCEPTION, path, INCEPTION_FEATURES, f"{INCEPTION} (torch-fidelity FID Inception, {path.name})")


def check_pair(
    samples: Tensor,
    reference: Tensor,
    *,
    extractor: Extractor,
    sample_name: str = "samples",
    reference_name: str = "reference",
) -> None:
    """One-line `UsageError`s for pairs the metrics cannot compare: shapes, channels, too few samples."""
    for images, name in ((samples, sample_name), (reference, reference_name)):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise UsageError(f"{name} must be uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
    if samples.shape[1] != reference.shape[1]:
        kinds = {1: "grayscale", 3: "RGB"}
        raise UsageError(
            f"{sample_name} are {kinds.get(samples.shape[1], samples.shape[1])} but {reference_name} is "
            f"{kinds.get(reference.shape[1], reference.shape[1])}; compare like with like"
        )
    if samples.shape[2:] != reference.shape[2:]:
        raise UsageError(
            f"{sample_name} are {samples.shape[3]}x{samples.shape[2]} but {reference_name} is "
            f"{reference.shape[3]}x{reference.shape[2]}; resize one side first"
        )
    need = extractor.features + 1
    for images, name in ((samples, sample_name), (reference, reference_name)):
        if images.shape[0] < need:
            raise UsageError(
                f"{name} has {images.shape[0]} images; FID with {extractor.kind} features "
                f"({extractor.features}-d) needs at least {need} for a full-rank covariance"
            )


def compute_metrics(
    samples: Tensor,
    reference: Tensor,
    *,
    extractor: Extractor,
    batch_size: int = 256,
    seed: int = 0,
    prc: bool = True,
    kid_subset_size: int = 1000,
    device: str | None = None,
    reference_key: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """FID, KID (mean, std) and, with `prc`, precision/recall between uint8 (N, C, H, W) `samples` and
    `reference`, computed by torch-fidelity. KID's subset size is capped at the smaller set's size.
    `reference_key` (which must name the reference images AND the extractor's weights) lets torch-fidelity
    cache the reference features and statistics in `cache_dir`, for many evaluations against one reference."""
    check_pair(samples, reference, extractor=extractor)
    import torch_fidelity

    subset = min(kid_subset_size, samples.shape[0], reference.shape[0])
    if extractor.kind == INCEPTION:
        name, fe_path = INCEPTION_TF_NAME, str(extractor.weights)
        if samples.shape[1] == 1:  # Inception takes RGB
            samples, reference = samples.expand(-1, 3, -1, -1), reference.expand(-1, 3, -1, -1)
    else:
        register()
        name, fe_path = CNN_NAME, str(extractor.weights)
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    raw = torch_fidelity.calculate_metrics(
        input1=UInt8Images(samples.contiguous()),
        input2=UInt8Images(reference.contiguous()),
        cuda=cuda,
        batch_size=batch_size,
        fid=True,
        kid=True,
        prc=prc,
        feature_extractor=name,
        feature_extractor_weights_path=fe_path,
        kid_subset_size=subset,
        save_cpu_ram=True,
        verbose=False,
        rng_seed=seed,
        cache=reference_key is not None,
        input2_cache_name=reference_key,
        cache_root=None if cache_dir is None else str(cache_dir),
    )
    out = {
        "fid": raw["frechet_inception_distance"],
        "kid_mean": raw["kernel_inception_distance_mean"],
        "kid_std": raw["kernel_inception_distance_std"],
        "kid_subset_size": subset,
    }
    if prc:
        out.update(precision=raw["precision"], recall=raw["recall"])
    return out
