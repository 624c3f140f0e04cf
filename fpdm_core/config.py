"""Configuration: frozen, grouped, strict. TOML file + `--set a.b=v` overrides -> `Config`.

Unknown keys, wrong types and out-of-range values are `UsageError`s that name the key. Every checkpoint and
export stores `to_dict(config)` so it can be rebuilt with `from_dict`.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import attrs
from attrs import validators as v

from .errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


@attrs.frozen
class SolverConfig:
    """Which solver finds the fixed point and how hard it tries. `options` go to the solver's factory."""

    name: str = "anderson"
    max_iter: int = attrs.field(default=12, validator=v.ge(0))
    tol: float = attrs.field(default=0.0, validator=v.ge(0.0))
    check_every: int = attrs.field(default=1, validator=v.ge(1))
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Config:
    solver: SolverConfig = attrs.field(factory=SolverConfig)


def from_dict(cls: type[T], data: Any, *, path: str = "") -> T:
    """Build the attrs class `cls` from plain data, rejecting unknown keys and wrong types."""
    where = f"[{path.rstrip('.')}]" if path else "the config"
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in attrs.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(f"unknown key '{path}{unknown[0]}'; known keys in {where}: {', '.join(fields)}")
    values = {name: _coerce(hints[name], data[name], f"{path}{name}") for name in data}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad value in {where}: {exc}") from exc


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if attrs.has(hint):
        return from_dict(hint, value, path=f"{key}.")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(option, value, key)
            except UsageError:
                continue
        raise UsageError(f"{key} has the wrong type: {type(value).__name__} ({value!r}); expected {hint}")
    base = origin or hint
    if base is Any:
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base in (int, float) and isinstance(value, bool) or not isinstance(value, base):
        raise UsageError(f"{key} must be {base.__name__}, got {type(value).__name__} ({value!r})")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dicts (TOML/JSON-safe) of a config."""
    return attrs.asdict(config, recurse=True)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=v` -> (["a", "b"], v). The value is read as TOML (numbers, booleans, strings, arrays, inline
    tables); a bare word that is not valid TOML is taken as a string, so `--set solver.name=anderson` works."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set expects KEY=VALUE (e.g. solver.max_iter=8), got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return [part.strip() for part in key.split(".")], value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    defaults: tuple[str, ...] = (),
) -> Config:
    """Class defaults <- `defaults` (a command's own, as KEY=VALUE) <- TOML file <- `overrides`, validated
    into a frozen `Config`."""
    data: dict[str, Any] = {}
    _apply_overrides(data, defaults)
    if path is not None:
        try:
            _merge(data, tomllib.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise UsageError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read config {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"bad TOML in {path}: {exc}") from None
    _apply_overrides(data, overrides)
    return from_dict(Config, data)


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for part in keys[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--set {item}: {part!r} is a value, not a table")
            node = child
        node[keys[-1]] = value
