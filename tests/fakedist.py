"""Fake installed distributions (a dist-info folder with entry points) for plugin-loading tests."""

from __future__ import annotations

from pathlib import Path


def fake_dist(site: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str] | None = None) -> Path:
    """Write `<dist>-<version>.dist-info` declaring `entry_points` in the fpdm group, plus module sources."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[fpdm]\n{lines}\n")
    for module, source in (modules or {}).items():
        (site / f"{module}.py").write_text(source)
    return site
