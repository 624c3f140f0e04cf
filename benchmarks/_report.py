"""What every benchmark does with its results: JSON and markdown under benchmarks/results/, README table."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def write_results(out: Path, name: str, results: dict, table: str) -> None:
    """out/name.json and out/name.md, each written to a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    for fname, content in ((f"{name}.json", json.dumps(results, indent=2) + "\n"), (f"{name}.md", table)):
        tmp = out / f"{fname}.tmp"
        tmp.write_text(content)
        tmp.replace(out / fname)


def update_readme(marker: str, table: str) -> None:
    """Replace the text between <!-- bench:MARKER --> and <!-- /bench:MARKER --> in README.md."""
    readme = ROOT / "README.md"
    start, end = f"<!-- bench:{marker} -->", f"<!-- /bench:{marker} -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    readme.write_text(f"{head}{start}\n{table}{end}{rest.split(end, 1)[1]}")


def publish(out: Path, name: str, results: dict, table: str, *, readme: str | None = None) -> None:
    """write_results, then the README table between the `readme` markers when given, then the table to stdout."""
    write_results(out, name, results, table)
    if readme:
        update_readme(readme, table)
    print(table)
