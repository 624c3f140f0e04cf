"""The budget report under every registered sampler (issue 15, item 4): every block a model call evaluates is a
block `Pipeline.sample` reports, with a budget and with a fixed iteration count, guided or not; and per-sample
stopping (an adaptive allocator) works whatever the sampler."""

from __future__ import annotations

import pytest
import torch

import fpdm
from support import REGISTRY

SAMPLERS = REGISTRY.names("sampler")
STEPS = 4
BUDGET = 60  # block evaluations per image: Heun's 7 evaluations at 4 steps need 7 x (2 + 1) = 21 of them


@pytest.fixture(scope="module")
def pipe(trained):
    return fpdm.load(trained, registry=REGISTRY)


class Counter:
    """Forward hooks on the denoiser and on every module of its `block_modules()`: `calls` counts model calls and
    `blocks` the rows each block evaluation ran on, whatever the solver restricted or guidance doubled."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.calls, self.blocks = model, 0, 0

    def __enter__(self) -> Counter:
        self.handles = [self.model.register_forward_hook(self._call)]
        self.handles += [block.register_forward_hook(self._block) for block in self.model.block_modules()]
        assert len(self.handles) > 1, "the denoiser names no block modules to count"
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _call(self, module, args, output) -> None:  # type: ignore[no-untyped-def]
        self.calls += 1

    def _block(self, module, args, output) -> None:  # type: ignore[no-untyped-def]
        self.blocks += args[0].shape[0]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0], ids=["unguided", "guided"])
@pytest.mark.parametrize("spend", [{"budget": BUDGET}, {"iters": 2}], ids=["budget", "iters"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_block_evaluated_is_a_block_reported(pipe, sampler, spend, cfg_scale):
    with Counter(pipe.denoiser) as counted:
        out = pipe.sample(n=2, classes=[0, 1], steps=STEPS, sampler=sampler, cfg_scale=cfg_scale, seed=0, **spend)
    plan = out.plan["iterations"]  # one cap per model evaluation the sampler declares
    assert counted.calls == len(plan) == len(out.stats)  # one batch of 2: one model call per evaluation
    per_sample = 2 if cfg_scale != 1.0 else 1  # guidance runs each sample twice; the report counts it once
    assert counted.blocks == per_sample * int(out.blocks.sum())
    spent = len(plan) * pipe.denoiser.blocks_per_call(0) + sum(plan)  # tol 0: every cap is spent
    assert out.blocks.tolist() == [spent] * 2
    if "budget" in spend:
        assert spent == BUDGET  # the uniform allocator spends the budget exactly


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_per_sample_stopping_works_under_every_sampler(pipe, sampler):
    options = {"n": 3, "steps": STEPS, "sampler": sampler, "budget": BUDGET, "allocator": "adaptive", "seed": 0}
    with Counter(pipe.denoiser) as counted:
        together = pipe.sample(batch_size=3, tol=1.0, **options)
    alone = pipe.sample(batch_size=1, tol=1.0, **options)
    assert counted.blocks == int(together.blocks.sum())  # a stopped sample's rows are not evaluated
    assert (together.blocks <= BUDGET).all()
    stopped = [s for s, cap in zip(together.stats, together.plan["iterations"]) if s["iterations_mean"] < cap]
    assert stopped, f"no evaluation stopped early: {together.stats}"
    # Each sample stops on its own: its iterations at every evaluation do not depend on the batch it ran in.
    assert [s["iterations_mean"] for s in together.stats] == [s["iterations_mean"] for s in alone.stats]
    assert torch.equal(together.blocks, alone.blocks)
    torch.testing.assert_close(together.images, alone.images)
