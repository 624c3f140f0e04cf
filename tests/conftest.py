"""Shared test set-up: deterministic hypothesis, a registry of built-ins plus test plugins, and maps with
known answers. Everything runs on CPU in float64 unless a test is about another dtype."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SRC = ROOT / "examples" / "fpdm-plugin-example" / "src"

settings.register_profile(
    "fpdm", derandomize=True, deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fpdm"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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




def make_test_registry():
    """fpdm's built-ins (third-party plugins of this machine excluded) plus the example plugin."""
    from fpdm.registry import Registry

    if str(EXAMPLE_SRC) not in sys.path:
        sys.path.insert(0, str(EXAMPLE_SRC))
    import fpdm_plugin_example

    registry = Registry.load(only=[])
    info = registry.add_plugin(fpdm_plugin_example, name="barzilai_borwein", source="fpdm-plugin-example (tests)")
    assert info.error is None, info.error
    return registry


REGISTRY = make_test_registry()
SOLVER_NAMES = REGISTRY.names("solver")
