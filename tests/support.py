"""Plain helpers the tests import (`from support import ...`): paths, the test registry, a tiny config, the
CLI as a user runs it. Fixtures live in conftest.py; conftest itself is never imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fpdm-plugin-example"
EXAMPLE_SRC = EXAMPLE / "src"


def make_test_registry() -> Any:
    """fpdm's built-ins (third-party plugins of this machine excluded) plus the example plugin."""
    from fpdm.registry import Registry

    if str(EXAMPLE_SRC) not in sys.path:  # the example is not installed: import it from its source tree
        sys.path.insert(0, str(EXAMPLE_SRC))
    import fpdm_plugin_example

    registry = Registry.load(only=[])
    info = registry.add_plugin(fpdm_plugin_example, name="barzilai_borwein", source="fpdm-plugin-example (tests)")
    assert info.error is None, info.error
    return registry


REGISTRY = make_test_registry()
SOLVER_NAMES = REGISTRY.names("solver")


def tiny_config(images: Path, out: Path, *extra: str) -> Any:
    """A model and run small enough to train in a second on CPU."""
    from fpdm.config import load_config

    return load_config(
        overrides=[
            "model.arch=FPDM-XS/2",
            "model.hidden_size=32",
            "model.num_heads=2",
            "data.name=image_folder",
            f"data.path={json.dumps(str(images))}",
            "data.image_size=8",
            "train.batch_size=8",
            "train.steps=6",
            "train.log_every=2",
            "train.ckpt_every=3",
            "train.no_grad_iters=[0, 3]",
            "train.grad_iters=[1, 2]",
            "train.lr=1e-3",
            f"train.out_dir={json.dumps(str(out))}",
            *extra,
        ]
    )


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`fpdm ARGS` as a user runs it. Third-party plugins installed on this machine stay out unless a test
    brings its own through `env`."""
    full_env = {**os.environ, "FPDM_LOAD_PLUGINS": "", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fpdm.apps.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=300,
    )


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A `run_cli` result that failed as a usage error: exit 2 and one stderr line holding every needle."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
