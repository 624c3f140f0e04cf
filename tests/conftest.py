"""Shared test set-up: deterministic hypothesis, a registry of built-ins plus test plugins, and maps with
known answers. Everything runs on CPU in float64 unless a test is about another dtype."""

from __future__ import annotations

import os
import subprocess
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


def tiny_config(images, out, *extra: str):  # type: ignore[no-untyped-def]
    """A model and run small enough to train in a second on CPU."""
    import json

    from fpdm.config import load_config

    return load_config(overrides=[
        "model.arch=FPDM-XS/2", "model.hidden_size=32", "model.num_heads=2",
        "data.name=image_folder", f"data.path={json.dumps(str(images))}", "data.image_size=8",
        "train.batch_size=8", "train.steps=6", "train.log_every=2", "train.ckpt_every=3",
        "train.no_grad_iters=[0, 3]", "train.grad_iters=[1, 2]", "train.lr=1e-3", f"train.out_dir={json.dumps(str(out))}",
        *extra])


@pytest.fixture(scope="session")
def trained(images, tmp_path_factory):
    """A tiny trained FPDM run folder, shared by the sampling and export tests."""
    from fpdm.training.loop import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(images, out), registry=REGISTRY, progress=False)
    return out


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`fpdm ARGS` as a user runs it. Third-party plugins installed on this machine stay out unless a test
    brings its own through `env`."""
    full_env = {**os.environ, "FPDM_LOAD_PLUGINS": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fpdm.apps.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=300)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A `run_cli` result that failed as a usage error: exit 2 and one stderr line holding every needle."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
