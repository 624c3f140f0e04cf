"""`fpdm.__version__`, torch-free so the CLI's `--version` and the core can read it without the package root."""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("fpdm")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
