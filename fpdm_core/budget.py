"""What `--budget` means: transformer-block evaluations per sample, given as blocks or as DiT-step equivalents.

`--budget 60` is 60 block evaluations per image, the paper's unit (an FPDM evaluation costs pre + iterations +
post blocks, a DiT evaluation its depth). `--budget 10dit` is 10 DiT steps' worth: 10 x the depth of the DiT of
the model's size (FPDM-XS/4 is measured against DiT-XS/4, depth 6, so 10dit = 60 blocks; a DiT model counts its
own depth). The unit is kept as given, so plans and reports can say both.

Torch-free: `fpdm.config` validates budgets with `parse_budget` at config time.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import attrs

from fpdm.errors import UsageError

if TYPE_CHECKING:
    from fpdm.config import Config

UNITS = ("blocks", "dit")
FORMS = "block evaluations per sample (an integer >= 1, e.g. 60) or DiT-step equivalents (e.g. 10dit)"
_TEXT = re.compile(r"^\s*(\d+)\s*(dit)?\s*$", re.IGNORECASE)


@attrs.frozen
class Budget:
    """A sampling budget: `value` blocks, or `value` DiT steps (`unit` "dit") that `blocks` turns into blocks."""

    value: int
    unit: str = "blocks"

    def __str__(self) -> str:
        """The canonical text: "60" for blocks, "10dit" for DiT steps (what plans are keyed by)."""
        return f"{self.value}dit" if self.unit == "dit" else str(self.value)

    @property
    def option(self) -> int | str:
        """The form the `budget` option fields hold: an int of blocks, or "Ndit"."""
        return self.value if self.unit == "blocks" else str(self)

    def blocks(self, config: Config) -> int:
        """Block evaluations per sample for a model of `config` (the run's `fpdm.config.Config`)."""
        return self.value if self.unit == "blocks" else self.value * dit_depth(config)


def parse_budget(value: str | int | Budget) -> Budget:
    """`60`, `"60"` -> 60 blocks; `"10dit"` -> 10 DiT steps. Anything else is one UsageError line naming the forms."""
    if isinstance(value, Budget):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise UsageError(f"budget must be {FORMS}, got {value}")
        return Budget(value)
    match = _TEXT.match(value) if isinstance(value, str) else None
    if match is None or int(match[1]) < 1:
        raise UsageError(f"budget must be {FORMS}, got {value!r}")
    return Budget(int(match[1]), "dit" if match[2] else "blocks")


def budget_value(value: Any) -> int | str | None:
    """attrs converter of the `budget` option fields: None, an int of blocks, or "Ndit" (validated here)."""
    return None if value is None else parse_budget(value).option


def resolve_blocks(value: str | int | Budget | None, config: Config) -> int | None:
    """The block evaluations a budget option stands for (None stays None)."""
    return None if value is None else parse_budget(value).blocks(config)


def dit_depth(config: Config) -> int:
    """The depth of the DiT that one DiT step stands for: a DiT's own (`model.depth`, else its size's), the DiT of
    the same size for any other family (FPDM-XS/4 -> DiT-XS/4)."""
    # Imported here: the size table lives beside the model (with torch); budgets are parsed without it.
    from fpdm.models.transformer import SIZES, parse_arch

    family, size, _ = parse_arch(config.model.arch)
    if family == "dit" and config.model.depth is not None:
        return config.model.depth
    return SIZES[size][2]
