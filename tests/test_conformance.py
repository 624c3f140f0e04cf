"""Every registered implementation passes its kind's conformance suite from fpdm.testing (built-ins and the
example plugin alike): the same suites a third-party author runs on a plugin."""

from __future__ import annotations

import functools

import pytest

from fpdm.testing import cases
from support import REGISTRY

TINY = {"input_size": 8, "in_channels": 1, "patch_size": 2, "hidden_size": 32, "num_heads": 2, "num_classes": 3}
DENOISER_OPTIONS = {"fpdm": TINY, "dit": {**TINY, "depth": 2}}


def _denoisers() -> dict[str, functools.partial]:
    unknown = set(REGISTRY.names("denoiser")) - set(DENOISER_OPTIONS)
    assert not unknown, f"give the denoiser suite tiny options for {sorted(unknown)}"
    return {
        name: functools.partial(REGISTRY.create, "denoiser", name, **DENOISER_OPTIONS[name])
        for name in REGISTRY.names("denoiser")
    }


@pytest.mark.parametrize("case", cases("solver", REGISTRY))
def test_solver(case):
    case()


@pytest.mark.parametrize("case", cases("schedule", REGISTRY))
def test_schedule(case):
    case()


@pytest.mark.parametrize("case", cases("schedule", REGISTRY, num_train_timesteps=7, zero_terminal_snr=True))
def test_short_zero_terminal_snr_schedule(case):
    case()


@pytest.mark.parametrize("case", cases("allocator", REGISTRY))
def test_allocator(case):
    case()


@pytest.mark.parametrize("case", cases("reuse_policy", REGISTRY))
def test_reuse_policy(case):
    case()


@pytest.mark.parametrize("case", cases("denoiser", _denoisers()))
def test_denoiser(case):
    case()


@pytest.mark.parametrize("case", cases("sampler", REGISTRY))
def test_sampler(case):
    case()


SAMPLER_VARIANTS = {  # options that change the method: stochastic DDIM, the eta = 0 ODE limits, UniPC's orders
    "ddim(eta=1)": ("ddim", {"eta": 1.0}),
    "euler_ancestral(eta=0)": ("euler_ancestral", {"eta": 0.0}),
    "dpmpp_2m_sde(eta=0)": ("dpmpp_2m_sde", {"eta": 0.0}),
    "unipc(solver_order=1)": ("unipc", {"solver_order": 1}),
    "unipc(solver_order=3)": ("unipc", {"solver_order": 3}),
}


@pytest.mark.parametrize(
    "case",
    cases(
        "sampler",
        {
            label: functools.partial(REGISTRY.create, "sampler", name, **opts)
            for label, (name, opts) in SAMPLER_VARIANTS.items()
        },
    ),
)
def test_sampler_variant(case):
    case()


@pytest.mark.slow  # three ONNX exports and onnxruntime runs: about a minute on 2 CPU cores
@pytest.mark.parametrize("case", cases("exporter", REGISTRY))
def test_exporter(case):
    case()
