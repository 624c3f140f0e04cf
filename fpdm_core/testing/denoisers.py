"""The denoiser contract (`fpdm.interfaces.Denoiser`, and `FixedPointDenoiser` for fixed-point models).

`make(**options)` builds a small model; the suite reads `in_channels`, `input_size` and `num_classes` from
it (the sampler and the exporter read them too) and adds N(0, 0.02^2) noise to every parameter first, so a
zero-initialised output layer (adaLN-Zero) cannot hide a wrong shape or a broken gradient path. Fixed-point
models are solved with plain iteration at tol = 0 (exact counts), written here so the suite needs no plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fpdm.interfaces import (
    Denoiser,
    DenoiserOutput,
    FixedPointDenoiser,
    FixedPointProblem,
    SolverStats,
)
from fpdm.solving.iterative import IterativeSolver
from fpdm.testing.suite import Make

BATCH = 3


class Iterate(IterativeSolver):
    """z <- f(z): the reference solver of the denoiser suite."""

    def init_state(self, z0: Tensor) -> None:
        return None

    def step(self, state: None, z: Tensor, fz: Tensor, *, exportable: bool = False) -> tuple[Tensor, None]:
        return fz, None

    def select_state(self, state: None, rows: Tensor) -> None:
        return None


def build(make: Make) -> Denoiser:
    """A fresh model from `make`, perturbed, in eval mode."""
    model = make()
    assert isinstance(model, Denoiser), f"the factory built {type(model).__name__}, not an fpdm Denoiser"
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def inputs(model: Denoiser, batch: int = BATCH, seed: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    """x (B, C, H, W), t (B,) training timesteps, y (B,) labels (None for an unconditional model)."""
    gen = torch.Generator().manual_seed(seed)
    c, s, classes = model.in_channels, model.input_size, model.num_classes
    x = torch.randn(batch, c, s, s, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, classes + 1, (batch,), generator=gen) if classes else None  # index num_classes: null
    return x, t, y


def call(model: Denoiser, x: Tensor, t: Tensor, y: Tensor | None, **options: Any) -> DenoiserOutput:
    out = model(x, t, y, solver=Iterate(), **options)
    assert isinstance(out, DenoiserOutput), f"forward returned {type(out).__name__}, not a DenoiserOutput"
    return out


def exposes_what_the_sampler_reads(make: Make) -> None:
    """in_channels, input_size, num_classes are ints; blocks_per_call(k) >= 0 is the model's depth plus k
    for a FixedPointDenoiser and does not depend on k otherwise."""
    model = build(make)
    for name in ("in_channels", "input_size", "num_classes"):
        value = getattr(model, name, None)
        assert type(value) is int and value >= 0, f"{name} is {value!r}: the sampler and exporter read it"
    counts = [model.blocks_per_call(k) for k in range(4)]
    assert all(type(n) is int and n >= 0 for n in counts), f"blocks_per_call(0..3) = {counts}"
    if isinstance(model, FixedPointDenoiser):
        assert counts == [model.pre_depth + k + model.post_depth for k in range(4)], counts
    else:
        assert len(set(counts)) == 1, f"a denoiser that is not a FixedPointDenoiser spends no iterations: {counts}"


def outputs_have_the_promised_shapes(make: Make) -> None:
    """pred (B, C or 2C, H, W) finite; blocks int64 (B,); z (B, T, D) and stats per sample for fixed-point
    models, z None otherwise."""
    model = build(make)
    x, t, y = inputs(model)
    fixed_point = isinstance(model, FixedPointDenoiser)
    with torch.no_grad():
        for iters in (0, 1, 3):
            out = call(model, x, t, y, iters=iters)
            pred, where = out.pred, f"iters={iters}"
            assert pred.shape[0] == BATCH and pred.shape[2:] == x.shape[2:], f"{where}: pred {tuple(pred.shape)}"
            assert pred.shape[1] in (x.shape[1], 2 * x.shape[1]), f"{where}: {pred.shape[1]} output channels"
            assert pred.is_floating_point() and torch.isfinite(pred).all(), f"{where}: pred not finite floats"
            assert out.blocks.dtype == torch.int64 and out.blocks.shape == (BATCH,), f"{where}: blocks {out.blocks}"
            if not fixed_point:
                assert out.z is None and out.stats is None, f"{where}: only fixed-point models return z and stats"
                continue
            assert out.z is not None and out.z.dim() == 3 and out.z.shape[0] == BATCH, f"{where}: z {out.z}"
            if iters:
                assert isinstance(out.stats, SolverStats) and out.stats.batch_size == BATCH, f"{where}: stats"
                assert out.stats.iterations.tolist() == [iters] * BATCH, f"{where}: {out.stats.iterations}"


def blocks_are_counted(make: Make) -> None:
    """blocks per sample = blocks_per_call(iters + grad_iters) for fixed-point models (per-sample caps too),
    blocks_per_call(0) otherwise, and equals the block evaluations forward hooks on block_modules() see."""
    model = build(make)
    x, t, y = inputs(model)
    fixed_point = isinstance(model, FixedPointDenoiser)
    seen: list[int] = []
    hooks = [m.register_forward_hook(lambda *_: seen.append(1)) for m in model.block_modules()]
    try:
        for iters, grad_iters in ((0, 0), (2, 0), (3, 2)):
            seen.clear()
            out = call(model, x, t, y, iters=iters, grad_iters=grad_iters)
            spent = iters + grad_iters if fixed_point else 0
            expected = model.blocks_per_call(spent)
            assert out.blocks.tolist() == [expected] * BATCH, f"iters={iters}, grad_iters={grad_iters}: {out.blocks}"
            if hooks:
                assert len(seen) == expected, f"iters={iters}: hooks saw {len(seen)} block calls, reported {expected}"
    finally:
        for hook in hooks:
            hook.remove()
    if fixed_point:
        caps = torch.tensor([0, 2, 5][:BATCH])
        with torch.no_grad():
            out = call(model, x, t, y, iters=caps)
        assert out.blocks.tolist() == [model.blocks_per_call(int(k)) for k in caps], f"caps {caps}: {out.blocks}"


def grad_phase_carries_the_gradient(make: Make) -> None:
    """Grad mode is the caller's; for fixed-point models the `iters` phase keeps no graph (z is detached) and
    `grad_iters` evaluations carry one; backward reaches the parameters with finite gradients."""
    model = build(make)
    x, t, y = inputs(model)
    with torch.no_grad():
        out = call(model, x, t, y, iters=2, grad_iters=1)
    assert not out.pred.requires_grad, "under no_grad the prediction must not require grad"
    fixed_point = isinstance(model, FixedPointDenoiser)
    for grad_iters in (0, 2) if fixed_point else (0,):
        model.zero_grad(set_to_none=True)
        out = call(model, x, t, y, iters=2, grad_iters=grad_iters)
        assert torch.is_grad_enabled(), "forward switched grad mode off for its caller"
        assert out.pred.requires_grad, f"grad_iters={grad_iters}: the prediction must be differentiable"
        if fixed_point:
            assert out.z is not None and out.z.requires_grad == (grad_iters > 0), (
                f"grad_iters={grad_iters}: z.requires_grad is {out.z is not None and out.z.requires_grad}"
            )
        out.pred.square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), "no finite gradient reached the parameters"


def deterministic_and_rows_independent(make: Make) -> None:
    """In eval mode the same inputs give the same outputs, and each row equals that sample run alone."""
    model = build(make)
    x, t, y = inputs(model)
    with torch.no_grad():
        a, b = call(model, x, t, y, iters=2), call(model, x, t, y, iters=2)
        assert torch.equal(a.pred, b.pred) and torch.equal(a.blocks, b.blocks), "two calls differ"
        for row in range(BATCH):
            one = slice(row, row + 1)
            alone = call(model, x[one], t[one], None if y is None else y[one], iters=2)
            torch.testing.assert_close(alone.pred, a.pred[one], rtol=1e-4, atol=1e-5)
            if a.z is not None and alone.z is not None:
                torch.testing.assert_close(alone.z, a.z[one], rtol=1e-4, atol=1e-5)


def fixed_point_pieces_compose(make: Make) -> None:
    """FixedPointDenoiser: forward = finish(solve(prepare(...).f from z0 or start)); z0 = z with iters = 0
    returns that z and its prediction; f keeps z's shape and restricts to rows."""
    model = build(make)
    if not isinstance(model, FixedPointDenoiser):
        return
    x, t, y = inputs(model)
    with torch.no_grad():
        out = call(model, x, t, y, iters=3)
        problem = model.prepare(x, t, y)
        assert isinstance(problem, FixedPointProblem), f"prepare returned {type(problem).__name__}"
        assert out.z is not None and problem.start.shape == out.z.shape, (problem.start.shape, out.z)
        z = Iterate().solve(problem.f, problem.start, max_iter=3, tol=0).z
        torch.testing.assert_close(model.finish(z, problem), out.pred, rtol=1e-5, atol=1e-6)
        again = call(model, x, t, y, z0=out.z, iters=0)
        assert again.z is not None and torch.equal(again.z, out.z), "z0 with iters=0 must come back as z"
        torch.testing.assert_close(again.pred, out.pred, rtol=1e-5, atol=1e-6)
        warm = call(model, x, t, y, z0=out.z, iters=1)
        torch.testing.assert_close(warm.z, problem.f(out.z), rtol=1e-5, atol=1e-6)
        restrict: Callable[[Tensor], Any] | None = getattr(problem.f, "restrict", None)
        if restrict is not None:
            rows = torch.tensor([BATCH - 1, 0])
            torch.testing.assert_close(restrict(rows)(out.z[rows]), problem.f(out.z)[rows], rtol=1e-5, atol=1e-6)


def holds_no_state_between_calls(make: Make) -> None:
    """A call leaves no state behind: parameters and buffers are unchanged and calls in any order agree."""
    model = build(make)
    x, t, y = inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        first = call(model, x, t, y, iters=2).pred
        call(model, *inputs(model, seed=1), iters=4)
        again = call(model, x, t, y, iters=2).pred
    assert torch.equal(first, again), "a call changed what the next one returns"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a call changed parameters or buffers"


CONTRACTS = (
    exposes_what_the_sampler_reads,
    outputs_have_the_promised_shapes,
    blocks_are_counted,
    grad_phase_carries_the_gradient,
    deterministic_and_rows_independent,
    fixed_point_pieces_compose,
    holds_no_state_between_calls,
)
