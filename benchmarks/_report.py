"""What every benchmark does with its results: JSON and markdown under benchmarks/results/, a table in docs/.

Each table lives in one docs page between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; a script's
`--update-docs` rewrites only the text between its markers (docs/benchmarks.md unless the script names another
page, as paper_claims does with docs/paper-claims.md). README.md holds no generated tables.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"


def write_results(out: Path, name: str, results: dict, table: str) -> None:
    """out/name.json and out/name.md, each written to a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    for fname, content in ((f"{name}.json", json.dumps(results, indent=2) + "\n"), (f"{name}.md", table)):
        tmp = out / f"{fname}.tmp"
        tmp.write_text(content)
        tmp.replace(out / fname)


def update_doc(marker: str, table: str, *, page: str = "benchmarks.md", docs: Path = DOCS) -> None:
    """Replace the text between <!-- bench:MARKER --> and <!-- /bench:MARKER --> in docs/PAGE (renamed into
    place, so a reader never sees half a page). Missing markers are an error: a table never lands elsewhere."""
    path = docs / page
    start, end = f"<!-- bench:{marker} -->", f"<!-- /bench:{marker} -->"
    text = path.read_text() if path.is_file() else ""
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{head}{start}\n{table}{end}{rest.split(end, 1)[1]}")
    tmp.replace(path)


def publish(
    out: Path, name: str, results: dict, table: str, *, doc: str | None = None, page: str = "benchmarks.md"
) -> None:
    """write_results, then the table between the `doc` markers of docs/PAGE when given, then the table to stdout."""
    write_results(out, name, results, table)
    if doc:
        update_doc(doc, table, page=page)
    print(table)
