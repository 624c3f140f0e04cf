"""Fake installed distributions (a dist-info folder with entry points) for plugin-loading tests."""

from __future__ import annotations

from pathlib import Path


def fake_dist(
    site: Path,
    dist: str,
    version: str,
    entry_points: dict[str, str],
    modules: dict[str, str] | None = None,
    *,
    group: str = "fpdm",
    more_groups: dict[str, dict[str, str]] | None = None,
) -> Path:
    """Write `<dist>-<version>.dist-info` declaring `entry_points` in `group` (the `fpdm` group unless told;
    `fpdm.cli` for command plugins) and `more_groups` ({group: entry points}), plus module sources."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    sections = []
    for name, points in {group: entry_points, **(more_groups or {})}.items():
        lines = "\n".join(f"{entry} = {target}" for entry, target in points.items())
        sections.append(f"[{name}]\n{lines}\n")
    (info / "entry_points.txt").write_text("\n".join(sections))
    for module, source in (modules or {}).items():
        (site / f"{module}.py").write_text(source)
    return site
