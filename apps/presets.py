"""TOML presets shipped with fpdm (apps/presets/*.toml), usable by name wherever a config path is."""

from __future__ import annotations

from pathlib import Path

from fpdm.errors import UsageError

PRESETS = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def resolve_config(name_or_path: str) -> Path:
    """A TOML path as given, or the preset of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESETS / f"{name_or_path}.toml"
    if preset.is_file():
        return preset
    raise UsageError(f"config {name_or_path!r} is neither a file nor a preset; presets: {', '.join(preset_names())}")
