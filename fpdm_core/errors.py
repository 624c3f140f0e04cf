"""Errors a user can cause. The CLI prints each as one line and exits non-zero; library callers can catch them.

`UsageError` (exit 2) is bad input: a name, an option, a file. `FpdmRuntimeError` (exit 1) is a run that
started correctly and then failed. Both subclass the built-in exception a Python user would expect.
"""

from __future__ import annotations

from collections.abc import Iterable


class FpdmError(Exception):
    """Base of every error fpdm raises on purpose; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(FpdmError, ValueError):
    """Bad input from the user: unknown name, bad option, malformed file. CLI exit code 2."""

    exit_code = 2


class UnknownNameError(UsageError, KeyError):
    """A name that is not registered; the message lists the known ones."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        listing = ", ".join(known) if known else "(none registered)"
        super().__init__(f"unknown {kind} {name!r}; known: {listing}")
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0])


class DuplicateNameError(UsageError):
    """A plugin tried to register a name another plugin already holds."""


class PluginError(FpdmError):
    """A plugin failed to load, registered badly, or returned the wrong thing."""


class FpdmRuntimeError(FpdmError, RuntimeError):
    """A run that started from valid input and failed. CLI exit code 1."""
