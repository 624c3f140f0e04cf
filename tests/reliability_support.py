"""Shared by the reliability tests: `fpdm` called in-process, one-line error checks, and the counts that
README's Reliability section quotes (written to JSON when FPDM_RELIABILITY_JSON names a file)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from pathlib import Path

COUNTS: Counter[str] = Counter()
ENV_REPORT = "FPDM_RELIABILITY_JSON"


def cli(*argv: str) -> tuple[int, str, str]:
    """`fpdm ARGV` through apps.cli.main in this process: (exit code, stdout, stderr). Much cheaper than a
    subprocess per case; argparse's SystemExit is caught like the shell would see it."""
    from fpdm.apps.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(
    code: int, stderr: str, *, expect: str | None = None, codes: tuple[int, ...] = (1, 2), kind: str = "bad_inputs"
) -> None:
    """Exit 1 or 2, exactly one stderr line naming the problem, no traceback, no 'internal error'; counted."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code in codes, (code, stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    assert lines[0].startswith("fpdm"), stderr
    if expect is not None:
        assert expect in lines[0], (expect, lines[0])
    COUNTS[kind] += 1
    COUNTS["tracebacks"] += 0  # the assertion above is the count: every counted case showed none


def flush_counts() -> None:
    """Merge this process's counts into the JSON report (keys from other test modules are kept)."""
    target = os.environ.get(ENV_REPORT)
    if not target:
        return
    path = Path(target)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(COUNTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(data.items())), indent=2) + "\n")
    tmp.replace(path)
