"""fpdm's multistep samplers against diffusers' schedulers on one eps function, when diffusers is importable (it
is not an fpdm dependency: `pip install --target DIR diffusers` and PYTHONPATH=DIR runs these).

DPM-Solver++(2M) and UniPC (bh2) match diffusers to its float32 rounding. DPM-Solver++(3M) does not, on purpose: the
weight of its quadratic Taylor term is the exact one here, alpha_t (1 - 2 (h - 1 + e^-h) / h^2), where diffusers
uses half of it (its local error is then O(h^3), so it converges at second order); the sampler conformance suite
measures the order of fpdm's."""

from __future__ import annotations

import math

import pytest
import torch

from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.interfaces import Denoised
from support import REGISTRY

diffusers = pytest.importorskip("diffusers")


def eps_model(x: torch.Tensor, t: float) -> torch.Tensor:
    """A smooth, nonlinear stand-in for a network: eps as a function of x and the timestep."""
    return torch.tanh(0.7 * x + 0.001 * t) + 0.1 * torch.sin(3 * x)


@pytest.mark.parametrize(
    "name, scheduler, options",
    [
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        ("unipc", "UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}),
    ],
)
@pytest.mark.parametrize("steps", [5, 10, 25])
def test_multistep_samplers_match_diffusers(name, scheduler, options, steps):
    schedule = REGISTRY.create("schedule", "linear")
    reference = getattr(diffusers, scheduler)(
        num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing", **options
    )
    reference.set_timesteps(steps)
    timesteps = reference.timesteps.tolist()
    assert timesteps == schedule.sampling_timesteps(steps, spacing="trailing").tolist()
    x_T = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x_T.clone()
    for t in reference.timesteps:
        x = reference.step(eps_model(x, float(t)), t, x).prev_sample

    process = GaussianDiffusion(schedule, learn_sigma=False).respace(sorted(timesteps))

    def evaluate(x: torch.Tensor, i: int) -> Denoised:
        ac = float(process.alphas_cumprod[i])
        eps = eps_model(x, float(process.timestep_map[i]))
        return Denoised((x - math.sqrt(1 - ac) * eps) / math.sqrt(ac), eps, eps)

    ours = REGISTRY.create("sampler", name)(evaluate, x_T, process, noise=lambda k: torch.zeros_like(x_T))
    # diffusers keeps its noise tables in float32: agreement to its rounding, far below a step's size
    torch.testing.assert_close(ours, x, rtol=0, atol=2e-4)
