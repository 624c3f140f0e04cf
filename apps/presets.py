"""TOML presets shipped with fpdm (apps/presets/*.toml), usable by name wherever a config path is."""

from __future__ import annotations

from pathlib import Path

from fpdm.errors import UsageError

PRESETS = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "fashion_mnist"


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


def default_run(checkpoint: str | None) -> str:
    """The checkpoint a command was given, or the run folder `fpdm train` writes by default, so that
    `fpdm train` then `fpdm export --onnx --iters 3` works without naming it."""
    if checkpoint is not None:
        return checkpoint
    from fpdm.config import load_config

    out = load_config(resolve_config(DEFAULT_PRESET)).train.out_dir
    if not (Path(out) / "checkpoints").is_dir():
        raise UsageError(
            f"no checkpoint given and the default run {out} has none: train one with `fpdm train` "
            "or name a run, checkpoint or .onnx file"
        )
    return out
