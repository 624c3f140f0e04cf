"""CLI start-time benchmark: wall time of `fpdm --help`, `fpdm --version` and `fpdm CMD --help` for every command.

    python benchmarks/cli_start.py [--runs N] [--quick] [--update-docs]

Each line is a fresh subprocess, as a user types it (the `fpdm` console script; `python -m fpdm.apps.cli` where
it is not installed), run N times; the table gives the median and the fastest. One more run per line with
PYTHONPROFILEIMPORTTIME says whether torch was imported. For scale, the same for a bare `python -c pass` and
`python -c "import torch"`. Third-party plugins stay out (FPDM_LOAD_PLUGINS=""). Target (issue 14): under
1 s for every line, which means no torch on these paths (STYLE.md rule 14). Writes
benchmarks/results/cli_start.json and .md; --update-docs replaces the `cli_start` table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from _report import RESULTS, publish
from fpdm.registry import Registry

TARGET_S = 1.0
HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "torch_fidelity")


def fpdm_command() -> list[str]:
    script = shutil.which("fpdm")
    return [script] if script else [sys.executable, "-m", "fpdm.apps.cli"]


def lines_to_time() -> list[tuple[str, list[str]]]:
    """(label, argv) for every start path: the top level, then each built-in command's --help."""
    fpdm = fpdm_command()
    commands = Registry.load(only=[]).names("command")  # the built-ins: a plugin's command is not fpdm's time
    return [
        ("fpdm --help", [*fpdm, "--help"]),
        ("fpdm --version", [*fpdm, "--version"]),
        *((f"fpdm {name} --help", [*fpdm, name, "--help"]) for name in commands),
    ]


def reference_lines() -> list[tuple[str, list[str]]]:
    return [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ('python -c "import torch"', [sys.executable, "-c", "import torch"]),
    ]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "FPDM_LOAD_PLUGINS": "", **extra}


def time_once(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, env=_env(), timeout=300)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return seconds


def heavy_imports(argv: list[str]) -> list[str]:
    """The heavy top-level packages (torch, onnx, ...) that `argv` imports, from Python's import-time log."""
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(PYTHONPROFILEIMPORTTIME="1"), timeout=300)
    names = {
        line.split("|")[-1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    return sorted(names & set(HEAVY))


def measure(label: str, argv: list[str], runs: int) -> dict:
    time_once(argv)  # warm the file cache so every line starts alike
    times = [time_once(argv) for _ in range(runs)]
    return {
        "line": label,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "heavy_imports": heavy_imports(argv),
    }


def markdown(results: dict) -> str:
    rows = ["| start path | median (s) | fastest (s) | imports | under 1 s |", "|---|---:|---:|---|:---:|"]
    for r in results["lines"]:
        ok = "yes" if r["median_s"] < results["target_s"] else "**no**"
        rows.append(
            f"| `{r['line']}` | {r['median_s']:.2f} | {r['min_s']:.2f} | "
            f"{', '.join(r['heavy_imports']) or 'no torch'} | {ok} |"
        )
    for r in results["reference"]:
        rows.append(
            f"| reference: `{r['line']}` | {r['median_s']:.2f} | {r['min_s']:.2f} | "
            f"{', '.join(r['heavy_imports']) or '-'} | |"
        )
    machine = results["machine"]
    rows.append("")
    cache = "" if machine["bytecode_cache"] else ", no bytecode cache (PYTHONDONTWRITEBYTECODE)"
    rows.append(
        f"Median of {results['runs']} fresh subprocesses per line, third-party plugins off; "
        f"{machine['cores']} cores, Python {machine['python']}, torch {machine['torch']}{cache}. "
        f"`{results['command']}`"
    )
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per line (default: 7)")
    parser.add_argument("--quick", action="store_true", help="2 runs per line (a smoke run)")
    parser.add_argument("--update-docs", action="store_true", help="refresh the cli_start table in docs/benchmarks.md")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)")
    args = parser.parse_args()
    runs = 2 if args.quick else args.runs
    if runs < 1:
        parser.error("--runs must be >= 1")
    lines = [measure(label, argv, runs) for label, argv in lines_to_time()]
    reference = [measure(label, argv, runs) for label, argv in reference_lines()]
    results = {
        "command": "python benchmarks/cli_start.py" + (" --quick" if args.quick else f" --runs {runs}"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": sys.version.split()[0],
            "torch": metadata.version("torch"),
            # with PYTHONDONTWRITEBYTECODE set, fpdm's own modules are compiled on every start
            "bytecode_cache": not os.environ.get("PYTHONDONTWRITEBYTECODE"),
        },
        "runs": runs,
        "target_s": TARGET_S,
        "lines": lines,
        "reference": reference,
        "all_under_target": all(r["median_s"] < TARGET_S for r in lines),
    }
    publish(args.out, "cli_start", results, markdown(results), doc="cli_start" if args.update_docs else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
