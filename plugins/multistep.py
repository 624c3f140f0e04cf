"""Built-in sigma-space and multistep samplers, written from the papers' equations on the `Sampler` protocol.

Every sampler here walks the respaced process's noise levels, noisiest first, then the data (sigma = 0), in the
variance-preserving coordinates x = alpha x0 + sigma eps (alpha = sqrt(ac), sigma = sqrt(1 - ac)), with the
half-log-SNR lambda = log(alpha / sigma). Karras et al.'s EDM sigma is sigma / alpha. All coefficients are
Python floats computed from the process's tables: nothing branches on tensor values, so every deterministic
sampler traces into an exported whole loop unchanged.

Under a zero-terminal-SNR schedule the noisiest level has alpha = 0 (lambda = -inf, an infinite EDM sigma).
The first-order update below is written with ratios that stay finite there, x_t = (sigma_t / sigma_s) x_s +
(alpha_t - alpha_s sigma_t / sigma_s) x0: at alpha_s = 0 it is the x0 limit sigma_t x_T + alpha_t x0. Every
higher-order term needs finite step sizes and is dropped on a step whose size is infinite (the first step under
zero SNR, and the last step, to the data, which is always x = x0: there is no noise left to integrate).

Multistep samplers keep their history (earlier x0 predictions) as local tensors of the call.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import attrs
import numpy as np
from attrs import validators as v
from torch import Tensor

from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.interfaces import Evaluate, NoiseSource, Sampler

# diffusers' rule for "lower order final": with fewer steps than this the last steps lower their order
# (higher-order extrapolation over few, long steps is unstable).
LOWER_ORDER_FINAL_BELOW = 15


@dataclasses.dataclass(frozen=True)
class Level:
    """One noise level: the respaced index (None for the data), VP alpha and sigma."""

    index: int | None
    alpha: float
    sigma: float

    @property
    def lam(self) -> float:
        """lambda = log(alpha / sigma): -inf at zero SNR, +inf at the data."""
        if self.sigma == 0:
            return math.inf
        if self.alpha == 0:
            return -math.inf
        return math.log(self.alpha / self.sigma)

    @property
    def edm_sigma(self) -> float:
        """Karras et al.'s sigma = sigma / alpha (inf at zero SNR, 0 at the data)."""
        return math.inf if self.alpha == 0 else self.sigma / self.alpha


def noise_levels(diffusion: GaussianDiffusion) -> list[Level]:
    """The process's levels from the noisiest to index 0, then the data: num_timesteps + 1 entries."""
    levels = []
    for i in reversed(range(diffusion.num_timesteps)):
        ac = diffusion.ac_values[i]
        levels.append(Level(i, math.sqrt(ac), math.sqrt(1.0 - ac)))
    return [*levels, Level(None, 1.0, 0.0)]


def first_order(x: Tensor, x0: Tensor, s: Level, t: Level) -> Tensor:
    """DDIM / DPM-Solver-1 / Euler in x0 form from level s to t (finite at zero SNR and at the data)."""
    ratio = t.sigma / s.sigma
    return ratio * x + (t.alpha - s.alpha * ratio) * x0


def step_size(s: Level, t: Level) -> float:
    """h = lambda_t - lambda_s (inf for a step from zero SNR or to the data)."""
    return t.lam - s.lam


def _lowered(order: int, step: int, steps: int, *, warmup_history: int, lower_final: bool) -> int:
    """The order step `step` of `steps` may use: at most what its history supports, and with `lower_final`
    on a short run at most the number of steps left (diffusers' lower_order_final)."""
    order = min(order, warmup_history + 1)
    if lower_final and steps < LOWER_ORDER_FINAL_BELOW:
        order = min(order, steps - step)
    return max(order, 1)


# ---------------------------------------------------------------------------------------------- EDM (Karras)


@attrs.frozen
class Euler(Sampler):
    """Karras et al. 2022 (EDM), Algorithm 1 without the second-order correction: one Euler step of the
    probability-flow ODE in sigma per evaluation. Nominal order 1. In x0 form it equals DDIM (eta 0).
    Default spacing: trailing."""

    order = 1
    default_spacing = "trailing"

    def __call__(self, evaluate: Evaluate, x: Tensor, diffusion: GaussianDiffusion, *, noise: NoiseSource) -> Tensor:
        levels = noise_levels(diffusion)
        for s, t in itertools.pairwise(levels):
            assert s.index is not None
            x = first_order(x, evaluate(x, s.index).x0, s, t)
        return x


@attrs.frozen
class EulerAncestral(Sampler):
    """Euler steps down to sigma_down, then fresh noise of size sigma_up (k-diffusion's ancestral rule, after
    Ho et al.'s ancestral sampling): sigma_up = eta sqrt(s_t^2 (s_s^2 - s_t^2) / s_s^2) in EDM sigmas,
    sigma_down = sqrt(s_t^2 - sigma_up^2). Nominal order 1 (weak). eta = 0 is Euler."""

    eta: float = attrs.field(default=1.0, converter=float, validator=[v.ge(0.0), v.le(1.0)])
    order = 1
    default_spacing = "trailing"

    @property
    def deterministic(self) -> bool:
        return self.eta == 0

    def __call__(self, evaluate: Evaluate, x: Tensor, diffusion: GaussianDiffusion, *, noise: NoiseSource) -> Tensor:
        levels = noise_levels(diffusion)
        drawn = 0
        for s, t in itertools.pairwise(levels):
            assert s.index is not None
            x0 = evaluate(x, s.index).x0
            if t.index is None or self.eta == 0:  # the last step lands on the data; eta 0 is plain Euler
                x = first_order(x, x0, s, t)
                continue
            # EDM sigmas k_s -> k_t; k_s / k_t = e^h. At zero SNR (k_s = inf) the fraction below is 1.
            k_t = t.edm_sigma
            kept = 1.0 - math.exp(-2.0 * step_size(s, t))  # 1 - k_t^2 / k_s^2
            up = min(k_t, self.eta * k_t * math.sqrt(kept))
            down = math.sqrt(k_t**2 - up**2)
            # Euler in EDM coordinates y = x / alpha from k_s to `down`: (down / k_s) y + (1 - down / k_s) x0,
            # with (down / k_s) y = down x / sigma_s (finite at zero SNR); then back to VP scale at level t.
            scaled = (down / s.sigma) * x + (1.0 - down * s.alpha / s.sigma) * x0
            x = t.alpha * (scaled + up * noise(drawn))
            drawn += 1
        return x


@attrs.frozen
class Heun(Sampler):
    """Karras et al. 2022 (EDM), Algorithm 1 (S_churn = 0): an Euler step to the next level, a second evaluation
    there, and the trapezoidal average of the two slopes. Nominal order 2. Costs 2 evaluations per step, except
    the last (to the data, an Euler step) and a first step from zero SNR (the x0 limit, whose slope is
    undefined). Default spacing: trailing."""

    order = 2
    default_spacing = "trailing"

    def levels(self, diffusion: GaussianDiffusion) -> list[int]:
        out = []
        levels = noise_levels(diffusion)
        for s, t in itertools.pairwise(levels):
            assert s.index is not None
            out.append(s.index)
            if t.index is not None and s.alpha > 0:
                out.append(t.index)
        return out

    def __call__(self, evaluate: Evaluate, x: Tensor, diffusion: GaussianDiffusion, *, noise: NoiseSource) -> Tensor:
        levels = noise_levels(diffusion)
        for s, t in itertools.pairwise(levels):
            assert s.index is not None
            x0 = evaluate(x, s.index).x0
            euler = first_order(x, x0, s, t)
            if t.index is None or s.alpha == 0:
                x = euler
                continue
            x0_t = evaluate(euler, t.index).x0
            # In EDM coordinates y = x / alpha, sigma k: y_t = y_s + (k_t - k_s) (d_s + d_t) / 2 with
            # d = (y - x0) / k; written out, back at VP scale.
            k_s, k_t = s.edm_sigma, t.edm_sigma
            y_s, y_e = x / s.alpha, euler / t.alpha
            slope = ((y_s - x0) / k_s + (y_e - x0_t) / k_t) / 2
            x = t.alpha * (y_s + (k_t - k_s) * slope)
        return x


# ---------------------------------------------------------------------------------------------- DPM-Solver++


@attrs.frozen
class DPMSolverPP(Sampler):
    """DPM-Solver++ multistep in data prediction (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and its third-order
    form): the exponential integrator x_t = (sigma_t / sigma_s) x_s + sigma_t int e^lambda x0(lambda) dlambda
    with x0 expanded in lambda around the latest evaluation, its derivatives from the earlier ones.
    `order` 2 (dpmpp_2m) or 3 (dpmpp_3m) is the nominal order. One evaluation per step.

    The third-order term uses the exact weight of the quadratic Taylor term, alpha_t (1 - 2 (h - 1 + e^-h) / h^2),
    with D2 = h^2 x0'' / 2 estimated from the last three evaluations.
    `lower_order_warmup`: the first steps use the order their history supports (1, then 2, ...). Off, dpmpp_3m
    starts with one Heun-corrected step (one extra evaluation at its next level) so the start costs no order.
    `lower_order_final`: with fewer than 15 steps the last steps lower their order (diffusers' rule).
    Default spacing: trailing."""

    order: int = attrs.field(default=2, validator=v.in_((1, 2, 3)))
    lower_order_warmup: bool = attrs.field(default=True, validator=v.instance_of(bool))
    lower_order_final: bool = attrs.field(default=True, validator=v.instance_of(bool))
    default_spacing = "trailing"

    def _heun_start(self, levels: Sequence[Level]) -> bool:
        """Whether the first step is Heun-corrected: only dpmpp_3m without warm-up, with finite levels."""
        return not self.lower_order_warmup and self.order >= 3 and len(levels) > 2 and levels[0].alpha > 0

    def levels(self, diffusion: GaussianDiffusion) -> list[int]:
        levels = noise_levels(diffusion)
        out = [s.index for s in levels[:-1] if s.index is not None]
        if self._heun_start(levels):
            assert levels[1].index is not None
            out.insert(1, levels[1].index)
        return out

    def __call__(self, evaluate: Evaluate, x: Tensor, diffusion: GaussianDiffusion, *, noise: NoiseSource) -> Tensor:
        levels = noise_levels(diffusion)
        steps = len(levels) - 1
        history: list[tuple[Level, Tensor]] = []  # (level, x0), latest last
        for j, (s, t) in enumerate(itertools.pairwise(levels)):
            assert s.index is not None
            x0 = evaluate(x, s.index).x0
            history = [*history, (s, x0)][-3:]
            if j == 0 and self._heun_start(levels):
                x = _heun_step(evaluate, x, x0, s, t)
                continue
            usable = _finite_history(history, t)
            order = _lowered(self.order, j, steps, warmup_history=usable, lower_final=self.lower_order_final)
            x = dpmpp_update(x, history, s, t, order)
        return x


def _finite_history(history: Sequence[tuple[Level, Tensor]], t: Level) -> int:
    """How many earlier evaluations a step to t may extrapolate from: every step size involved must be finite."""
    if not math.isfinite(t.lam) or not math.isfinite(history[-1][0].lam):
        return 0
    count = 0
    for level, _ in reversed(history[:-1]):
        if not math.isfinite(level.lam):
            break
        count += 1
    return count


def dpmpp_update(x: Tensor, history: Sequence[tuple[Level, Tensor]], s: Level, t: Level, order: int) -> Tensor:
    """One DPM-Solver++ step from s (history[-1]) to t of the given order (1..3), data prediction."""
    x0 = history[-1][1]
    if order == 1:
        return first_order(x, x0, s, t)
    h = step_size(s, t)
    (l1, x1) = history[-2]
    r0 = (s.lam - l1.lam) / h
    d1 = (x0 - x1) / r0  # ~ h x0'
    if order == 2:
        # Lu et al. 2022b, Algorithm 2: x0 + d1 / 2 in the first-order update.
        return first_order(x, x0 + d1 / 2, s, t)
    (l2, x2) = history[-3]
    r1 = (l1.lam - l2.lam) / h
    d1_1 = (x1 - x2) / r1
    first = d1 + r0 / (r0 + r1) * (d1 - d1_1)  # h x0' at s
    second = (d1 - d1_1) / (r0 + r1)  # h^2 x0'' / 2 at s
    em = math.expm1(-h)  # e^-h - 1
    w1 = (em + h) / h  # int_0^h e^-(h-u) u du / h
    w2 = 1.0 - 2.0 * (h + em) / h**2  # int_0^h e^-(h-u) u^2 du / h^2
    return (t.sigma / s.sigma) * x + t.alpha * (-em * x0 + w1 * first + w2 * second)


def _heun_step(evaluate: Evaluate, x: Tensor, x0: Tensor, s: Level, t: Level) -> Tensor:
    """A second-order start: the first-order step to t, an evaluation there, and the trapezoid in lambda of the
    two x0 predictions (x0 linear over the step), for a self-starting multistep method."""
    assert t.index is not None
    euler = first_order(x, x0, s, t)
    x0_t = evaluate(euler, t.index).x0
    h = step_size(s, t)
    em = math.expm1(-h)
    slope = (x0_t - x0) / h  # x0' over the step
    return (t.sigma / s.sigma) * x + t.alpha * (-em * x0 + (em + h) * slope)


@attrs.frozen
class DPMSolverPP2MSDE(Sampler):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, sec. 5; the "midpoint" form): the data-prediction SDE solved with
    the exponential integrator, x_t = (sigma_t / sigma_s) e^(-eta h) x_s + alpha_t (1 - e^-(1+eta) h) D +
    sigma_t sqrt(1 - e^(-2 eta h)) z, D the latest x0 plus half the first difference. Nominal order 2 in
    the ODE limit (eta = 0), weak order 1 as an SDE. One evaluation and one noise draw per step (none on the
    last). Default spacing: trailing."""

    eta: float = attrs.field(default=1.0, converter=float, validator=[v.ge(0.0), v.le(1.0)])
    lower_order_warmup: bool = attrs.field(default=True, validator=v.instance_of(bool))
    lower_order_final: bool = attrs.field(default=True, validator=v.instance_of(bool))
    order = 2
    default_spacing = "trailing"

    @property
    def deterministic(self) -> bool:
        return self.eta == 0

    def __call__(self, evaluate: Evaluate, x: Tensor, diffusion: GaussianDiffusion, *, noise: NoiseSource) -> Tensor:
        levels = noise_levels(diffusion)
        steps = len(levels) - 1
        history: list[tuple[Level, Tensor]] = []
        drawn = 0
        for j, (s, t) in enumerate(itertools.pairwise(levels)):
            assert s.index is not None
            x0 = evaluate(x, s.index).x0
            history = [*history, (s, x0)][-2:]
            if t.index is None:  # to the data: x = x0, nothing left to integrate
                x = x0
                continue
            usable = _finite_history(history, t)
            order = _lowered(2, j, steps, warmup_history=usable, lower_final=self.lower_order_final)
            h = step_size(s, t)
            decay = math.exp(-self.eta * h) if math.isfinite(h) else 0.0
            gain = -math.expm1(-(1.0 + self.eta) * h) if math.isfinite(h) else 1.0
            d = x0
            if order == 2:
                r = (s.lam - history[-2][0].lam) / h
                d = x0 + (x0 - history[-2][1]) / (2 * r)
            x = (t.sigma / s.sigma) * decay * x + t.alpha * gain * d
            if self.eta > 0:
                spread = -math.expm1(-2.0 * self.eta * h) if math.isfinite(h) else 1.0
                x = x + t.sigma * math.sqrt(spread) * noise(drawn)
                drawn += 1
        return x


# ---------------------------------------------------------------------------------------------- UniPC


@attrs.frozen
class UniPC(Sampler):
    """UniPC (Zhao et al. 2023) in data prediction with B(h) = e^h - 1 ("bh2"): the UniP predictor of order
    `solver_order` and the UniC corrector, which raises the order by one. The corrector at level t uses the
    evaluation at the predicted point, which the next predictor reuses, so it costs no extra evaluation.
    Nominal order solver_order + 1 (3 by default). One evaluation per step; the last step (to the data) is
    x = x0 and no corrector follows it.

    `lower_order_warmup`: the first steps use the order their history supports (always on: a multistep
    predictor has no other start; the corrector keeps the start at second order). `lower_order_final`: with
    fewer than 15 steps the last steps lower their order (diffusers' rule). Default spacing: trailing."""

    solver_order: int = attrs.field(default=2, validator=v.in_((1, 2, 3)))
    lower_order_warmup: bool = attrs.field(default=True, validator=v.instance_of(bool))
    lower_order_final: bool = attrs.field(default=True, validator=v.instance_of(bool))
    default_spacing = "trailing"

    @property
    def order(self) -> int:  # type: ignore[override]  # a property of the option, where the base has a constant
        return self.solver_order + 1

    def __call__(self, evaluate: Evaluate, x: Tensor, diffusion: GaussianDiffusion, *, noise: NoiseSource) -> Tensor:
        levels = noise_levels(diffusion)
        steps = len(levels) - 1
        history: list[tuple[Level, Tensor]] = []  # (level, x0) at the evaluated (uncorrected) points
        last: tuple[Tensor, int] | None = None  # (x at the previous level, the order its predictor used)
        for j, (s, t) in enumerate(itertools.pairwise(levels)):
            assert s.index is not None
            x0 = evaluate(x, s.index).x0
            if last is not None:  # correct the point just predicted, with the evaluation made there
                previous_x, used = last
                if math.isfinite(step_size(history[-1][0], s)):  # not after the x0 limit from zero SNR
                    x = unic(previous_x, history, (s, x0), used)
            history = [*history, (s, x0)][-self.solver_order :]
            if t.index is None:
                return x0
            usable = _finite_history(history, t)
            order = _lowered(self.solver_order, j, steps, warmup_history=usable, lower_final=self.lower_order_final)
            last = (x, order)
            x = unip(x, history, t, order)
        return x


def _unipc_system(
    history: Sequence[tuple[Level, Tensor]], s: Level, h: float, order: int
) -> tuple[list[float], np.ndarray]:
    """(rks, b): the ratios r_k = (lambda_{s-k} - lambda_s) / h of the earlier evaluations (then 1 for the
    corrector's point) and the right-hand side b_i = i! phi_{i+1}(-h) / B(h) of UniPC's order conditions."""
    rks = [(level.lam - s.lam) / h for level, _ in list(reversed(history[:-1]))[: order - 1]]
    hh = -h
    em = math.expm1(hh)  # e^-h - 1 = B(h) for bh2 in data prediction
    phi = em / hh - 1.0
    factorial = 1
    b = []
    for i in range(1, order + 1):
        b.append(phi * factorial / em)
        factorial *= i + 1
        phi = phi / hh - 1.0 / factorial
    return rks, np.array(b)


def _differences(history: Sequence[tuple[Level, Tensor]], rks: Sequence[float]) -> list[Tensor]:
    x0 = history[-1][1]
    earlier = list(reversed(history[:-1]))
    return [(earlier[k][1] - x0) / rks[k] for k in range(len(rks))]


def unip(x: Tensor, history: Sequence[tuple[Level, Tensor]], t: Level, order: int) -> Tensor:
    """The UniP-`order` predictor from the latest evaluated level (history[-1]) to t."""
    s, x0 = history[-1]
    h = step_size(s, t)
    em = math.expm1(-h)
    base = (t.sigma / s.sigma) * x - t.alpha * em * x0
    if order == 1:
        return base
    rks, b = _unipc_system(history, s, h, order)
    diffs = _differences(history, rks)
    if order == 2:
        rhos = [0.5]  # UniPC's choice for the two-point predictor (B(h) weights)
    else:
        R = np.array([[r**i for r in rks] for i in range(order - 1)])  # (order - 1, order - 1)
        rhos = np.linalg.solve(R, b[: order - 1]).tolist()
    return base - t.alpha * em * sum(rho * d for rho, d in zip(rhos, diffs))


def unic(x: Tensor, history: Sequence[tuple[Level, Tensor]], new: tuple[Level, Tensor], order: int) -> Tensor:
    """The UniC corrector of a step from history[-1]'s level (where x was) to new's level, using new's x0."""
    s, x0 = history[-1]
    t, x0_t = new
    h = step_size(s, t)
    em = math.expm1(-h)
    base = (t.sigma / s.sigma) * x - t.alpha * em * x0
    rks, b = _unipc_system(history, s, h, order)
    diffs = _differences(history, rks)
    if order == 1:
        rhos = [0.5]
    else:
        R = np.array([[r**i for r in [*rks, 1.0]] for i in range(order)])  # (order, order)
        rhos = np.linalg.solve(R, b[:order]).tolist()
    correction = sum((rho * d for rho, d in zip(rhos[:-1], diffs)), start=rhos[-1] * (x0_t - x0))
    return base - t.alpha * em * correction
