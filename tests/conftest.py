"""Shared test set-up: deterministic hypothesis, the GPU skip, and the session fixtures (a registry of built-ins
plus the example plugin, tiny image folders, one tiny trained run). Plain helpers live in support.py; tests
import them from there, never from this file."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from fpdm.registry import Registry
from support import REGISTRY, tiny_config

settings.register_profile(
    "fpdm", derandomize=True, deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fpdm"))
# Two threads on the 2-core CI machine; OMP_NUM_THREADS=1 on a machine shared with other work (where two threads per
# process oversubscribe the cores and tiny-model tests run many times slower).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def registry() -> Registry:
    """fpdm's built-ins plus the example plugin (`support.REGISTRY`)."""
    return REGISTRY


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Two classes of 8x8 gray images: bright squares and dark squares with noise."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    gen = torch.Generator().manual_seed(0)
    for label, level in (("bright", 200), ("dark", 60)):
        (root / label).mkdir()
        for i in range(12):
            pixels = (level + 30 * torch.randn(8, 8, generator=gen)).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def trained(images, tmp_path_factory):
    """A tiny trained FPDM run folder, shared by the sampling and export tests."""
    from fpdm.training.loop import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(images, out), registry=REGISTRY, progress=False)
    return out
