"""FPDM and DiT denoisers: sizes, the official layout, forward contracts, S-JFB gradient flow."""

from __future__ import annotations

import re

import pytest
import torch

from fpdm.build import build_denoiser
from fpdm.config import ModelConfig
from fpdm.errors import UsageError
from fpdm.models.transformer import FPDM, DiT, FixedPointMap, parse_arch, sincos_pos_embed
from support import REGISTRY, ROOT

LAYOUT = ROOT.parent / "shared" / "official_state_dict_layout.txt"


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "arch, expected",
    [("FPDM-XL/2", 86.5e6), ("DiT-XL/2", 674.8e6), ("FPDM-S/2", 9.96e6), ("DiT-S/2", 32.9e6)],
)
def test_parameter_counts_match_the_paper(arch, expected):
    with torch.device("meta"):  # no memory: XL DiT has 675M parameters
        model = build_denoiser(
            ModelConfig(arch=arch), input_size=32, in_channels=4, num_classes=1000, registry=REGISTRY
        )
    assert abs(n_params(model) - expected) / expected < 0.002


def test_fpdm_is_87_percent_smaller_than_dit_at_xl():
    with torch.device("meta"):
        fpdm, dit = FPDM(), DiT()
    assert round(1 - n_params(fpdm) / n_params(dit), 3) == 0.872


def _official_layout(section: str) -> dict[str, tuple[int, ...]]:
    text = LAYOUT.read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in body.splitlines():
        if "\t" in line:
            key, shape = line.split("\t")
            out[key] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return out


@pytest.mark.skipif(not LAYOUT.exists(), reason="shared/official_state_dict_layout.txt not present")
def test_state_dict_matches_the_official_layout():
    fpdm = FPDM(hidden_size=384, num_heads=6)
    dit = DiT(hidden_size=384, num_heads=6, depth=12)
    ours = {k: tuple(v.shape) for k, v in fpdm.state_dict().items()}
    assert ours == _official_layout("FPDM")
    ours_dit = {k: tuple(v.shape) for k, v in dit.state_dict().items() if not re.match(r"blocks\.([1-9]|1[01])\.", k)}
    assert ours_dit == _official_layout("DiT")


def test_pos_embed_is_the_mae_sincos():
    emb = sincos_pos_embed(8, 3)  # (9, 8)
    # token 4 is grid (row 1, col 1); first half encodes the column (w) axis, second half the row axis
    omega = 1 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    expected_axis = torch.cat([torch.sin(1.0 * omega), torch.cos(1.0 * omega)]).float()
    torch.testing.assert_close(emb[4, :4], expected_axis)
    torch.testing.assert_close(emb[4, 4:], expected_axis)
    torch.testing.assert_close(emb[1, :4], expected_axis)  # row 0, col 1
    torch.testing.assert_close(emb[1, 4:], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def tiny(cls, **kw):  # type: ignore[no-untyped-def]
    base = dict(input_size=8, in_channels=1, patch_size=2, hidden_size=32, num_heads=2, num_classes=3)
    model = cls(**{**base, **kw})
    for p in model.parameters():  # leave adaLN-Zero: random weights make every path matter
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_forward_shapes_blocks_and_stats():
    model = tiny(FPDM, pre_depth=2, post_depth=1)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 3])
    solver = REGISTRY.create("solver", "fixed_point")
    out = model(x, t, y, iters=4, solver=solver, grad_iters=2)
    assert out.pred.shape == (3, 2, 8, 8) and out.z.shape == (3, 16, 32)
    assert out.blocks.tolist() == [2 + 4 + 2 + 1] * 3 == [model.blocks_per_call(4) + 2] * 3
    assert out.stats.iterations.tolist() == [4, 4, 4]
    dit = tiny(DiT, depth=5)
    dout = dit(x, t, y)
    assert dout.pred.shape == (3, 2, 8, 8) and dout.z is None and dout.blocks.tolist() == [5, 5, 5]


def test_iterations_are_the_documented_map_and_z0_is_used():
    model = tiny(FPDM).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), torch.tensor([0, 2])
    solver = REGISTRY.create("solver", "fixed_point")
    with torch.no_grad():
        three = model(x, t, y, iters=3, solver=solver)
        # one iteration at a time, carrying z: the same as three at once (the sampler's solution reuse)
        z = None
        for _ in range(3):
            step = model(x, t, y, z0=z, iters=1, solver=solver)
            z = step.z
        torch.testing.assert_close(step.pred, three.pred)
        # and the same as the grad phase applying the map three times
        grad = model(x, t, y, iters=0, grad_iters=3)
        torch.testing.assert_close(grad.pred, three.pred, rtol=1e-5, atol=1e-6)


def test_fixed_point_map_restricts_rows():
    model = tiny(FPDM)
    u, c, z = torch.randn(4, 16, 32), torch.randn(4, 32), torch.randn(4, 16, 32)
    f = FixedPointMap(model, u, c)
    rows = torch.tensor([3, 1])
    torch.testing.assert_close(f.restrict(rows)(z[rows]), f(z)[rows])


def test_sjfb_gradients_flow_only_through_the_grad_phase():
    model = tiny(FPDM)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), torch.tensor([0, 2])
    solver = REGISTRY.create("solver", "anderson")
    out = model(x, t, y, iters=5, solver=solver, grad_iters=0)
    out.pred.sum().backward()
    # no grad iteration: the fixed-point block got no gradient, the post block and final layer did
    assert model.block_fixed_point.attn.qkv.weight.grad is None
    assert model.final_layer.linear.weight.grad is not None
    model.zero_grad()
    out = model(x, t, y, iters=5, solver=solver, grad_iters=2)
    out.pred.sum().backward()
    assert model.block_fixed_point.attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks_pre[0].attn.qkv.weight.grad.abs().sum() > 0  # through the injection u


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    plain = tiny(FPDM)
    ckpt = tiny(FPDM, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), torch.tensor([0, 2])
    for model in (plain, ckpt):
        model(x, t, y, iters=0, grad_iters=3).pred.square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_unconditional_and_bad_inputs():
    model = tiny(FPDM, num_classes=0)
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), None, iters=0, grad_iters=1)
    assert out.pred.shape == (2, 2, 8, 8) and model.y_embedder is None
    with pytest.raises(UsageError, match="class labels"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]), iters=0)
    with pytest.raises(UsageError, match="needs a solver"):
        tiny(FPDM)(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.tensor([0]), iters=2)
    with pytest.raises(UsageError, match="not divisible by patch size"):
        FPDM(input_size=30, patch_size=4)
    with pytest.raises(UsageError, match="pre_depth"):
        FPDM(input_size=8, hidden_size=32, num_heads=2, pre_depth=-1)


@pytest.mark.parametrize("arch", ["FPDM", "FPDM-XXL/2", "DiT-S/x", "-S/2"])
def test_bad_arch_names(arch):
    with pytest.raises(UsageError, match="bad model arch"):
        parse_arch(arch)


def test_fpdm_is_a_fixed_point_denoiser_and_dit_is_not():
    from fpdm.interfaces import FixedPointDenoiser, FixedPointProblem, is_fixed_point

    torch.manual_seed(0)
    model = FPDM(
        input_size=8, in_channels=1, patch_size=2, hidden_size=32, num_heads=2, pre_depth=2, post_depth=1, num_classes=3
    ).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)  # a contraction, so the iterates below stay small
    dit = DiT(input_size=8, in_channels=1, patch_size=2, hidden_size=32, num_heads=2, depth=3, num_classes=3)
    assert isinstance(model, FixedPointDenoiser) and is_fixed_point(model)
    assert not isinstance(dit, FixedPointDenoiser) and not is_fixed_point(dit)
    assert model.blocks_per_call(5) == 2 + 5 + 1 and dit.blocks_per_call(5) == 3
    assert len(model.block_modules()) == 2 + 1 + 1 and len(dit.block_modules()) == 3
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 70]), torch.tensor([0, 2])
    with torch.no_grad():
        problem = model.prepare(x, t, y)
        assert isinstance(problem, FixedPointProblem) and problem.start.shape == (2, 16, 32)  # (B, T, D)
        z = problem.start
        for _ in range(4):
            z = problem.f(z)
        out = model(x, t, y, iters=4, solver=REGISTRY.create("solver", "fixed_point"))  # prepare, solve, finish
    torch.testing.assert_close(model.finish(z, problem), out.pred, rtol=0, atol=1e-6)
