"""The example plugin's own tests pass when run the way its README says (pytest in its folder, nothing else
on the path): fpdm.testing works for a third party, not only inside fpdm's test tree."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import EXAMPLE


@pytest.mark.slow
def test_the_example_plugin_runs_its_own_conformance_tests():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Its own property tests at its own (default) hypothesis profile take a minute; the contract names, the
    # registration and one real solve cover the route a third party takes.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:benchmark",
            "-k",
            "registers or solves or tol_zero or unrolled",
        ],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "6 passed" in result.stdout, result.stdout[-500:]
