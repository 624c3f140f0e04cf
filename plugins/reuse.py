"""Built-in reuse policies: where each sampling step's fixed-point solve starts."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from attrs import validators as v
from torch import Tensor

from fpdm import hookimpl
from fpdm.hookspecs import Register
from fpdm.interfaces import ReusePolicy


@attrs.frozen
class Cold(ReusePolicy):
    """Every step starts from its own pre-block output (no reuse)."""

    history = 0

    def init(self, solutions: Sequence[Tensor], step: int) -> Tensor | None:
        return None


@attrs.frozen
class Reuse(ReusePolicy):
    """Start from the previous step's solution (the paper's solution reuse)."""

    history = 1

    def init(self, solutions: Sequence[Tensor], step: int) -> Tensor | None:
        return solutions[-1] if solutions else None


@attrs.frozen
class Extrapolate(ReusePolicy):
    """Start from z_1 + gamma (level - l_1) / (l_1 - l_2) (z_1 - z_2), z_1 and z_2 the last two solutions found at
    model timesteps l_1 and l_2: the solutions drift smoothly across noise levels, so a linear prediction of the
    next one starts closer than the last one does. The level ratio is 1 on evenly spaced steps (then it is
    z_1 + gamma (z_1 - z_2)) and scales the step on uneven ones (karras spacing, multistep samplers); an
    evaluation at the level of the last solution (Heun's and UniPC's repeats) starts from that solution."""

    gamma: float = attrs.field(default=0.5, converter=float, validator=[v.ge(0.0), v.le(2.0)])
    history = 2

    def init(self, solutions: Sequence[Tensor], step: int) -> Tensor | None:
        if len(solutions) < 2:
            return solutions[-1] if solutions else None
        return solutions[-1] + self.gamma * (solutions[-1] - solutions[-2])

    def warm_start(
        self, solutions: Sequence[Tensor], step: int, *, levels: Sequence[float], level: float
    ) -> Tensor | None:
        if len(solutions) < 2 or len(levels) < 2:
            return solutions[-1] if solutions else None
        (l2, l1), (z2, z1) = levels[-2:], solutions[-2:]
        if l1 == l2 or level == l1:
            return z1
        return z1 + self.gamma * (level - l1) / (l1 - l2) * (z1 - z2)


@hookimpl
def register_reuse_policies(register: Register) -> None:
    register("cold", Cold, description="start every step from its pre-block output")
    register("reuse", Reuse, description="start from the previous step's solution (paper)")
    register("extrapolate", Extrapolate, description="linear extrapolation from the last two solutions")
