"""`fpdm import-official`: official FPDM / DiT checkpoints become fpdm runs that compute what the official model
computes. The reference forward pass below is written from the state-dict tensors and the semantics in
shared/REFERENCE.md, not from fpdm's modules, so a semantic slip in fpdm's model fails here."""

from __future__ import annotations

import argparse
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from fpdm.build import build_schedule, load_denoiser
from fpdm.config import Config, from_dict
from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.diffusion.sampling import generate
from fpdm.errors import UsageError
from fpdm.io.checkpoint import load_checkpoint
from fpdm.io.official import import_official
from fpdm.models.transformer import sincos_pos_embed
from support import REGISTRY, ROOT, one_line_error, run_cli

LAYOUT = ROOT.parent / "shared" / "official_state_dict_layout.txt"
PARITY: dict[str, float] = {}  # max abs error per case, printed with -s


# ---------------------------------------------------------------------------------------------------------
# Official-layout state dicts and an independent functional forward pass


def ref_pos_embed(dim: int, grid: int) -> Tensor:
    """2-D sin-cos: first D/2 channels the column index, last D/2 the row index (MAE), tokens row-major."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    tok = torch.arange(grid * grid, dtype=torch.float64)

    def axis(pos: Tensor) -> Tensor:
        a = pos[:, None] * omega[None]  # (T, D/4)
        return torch.cat([a.sin(), a.cos()], dim=1)  # (T, D/2)

    return torch.cat([axis(tok % grid), axis(tok // grid)], dim=1).float()[None]  # (1, T, D)


def official_state_dict(
    *,
    fpdm: bool,
    hidden: int,
    patch: int = 2,
    grid: int = 4,
    classes: int = 5,
    learn_sigma: bool = True,
    pre: int = 1,
    post: int = 1,
    depth: int = 2,
    seed: int = 0,
    mlp_ratio: int = 4,
) -> dict[str, Tensor]:
    """Random weights under the official names and shapes (every adaLN non-zero, so every path matters)."""
    g = torch.Generator().manual_seed(seed)
    d, c = hidden, 4
    shapes: dict[str, tuple[int, ...]] = {
        "x_embedder.proj.weight": (d, c, patch, patch),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
    }
    if classes:
        shapes["y_embedder.embedding_table.weight"] = (classes + 1, d)

    def block(prefix: str) -> None:
        for name, shape in (
            ("attn.qkv", (3 * d, d)),
            ("attn.proj", (d, d)),
            ("mlp.fc1", (mlp_ratio * d, d)),
            ("mlp.fc2", (d, mlp_ratio * d)),
            ("adaLN_modulation.1", (6 * d, d)),
        ):
            shapes[f"{prefix}.{name}.weight"], shapes[f"{prefix}.{name}.bias"] = shape, shape[:1]

    if fpdm:
        for i in range(pre):
            block(f"blocks_pre.{i}")
        for name, shape in (
            ("block_pre_projection", (d, d)),
            ("block_fixed_point_projection_fc1", (2 * d, 2 * d)),
            ("block_fixed_point_projection_fc2", (d, 2 * d)),
        ):
            shapes[f"{name}.weight"], shapes[f"{name}.bias"] = shape, shape[:1]
        block("block_fixed_point")
        for i in range(post):
            block(f"blocks_post.{i}")
    else:
        for i in range(depth):
            block(f"blocks.{i}")
    out = patch * patch * c * (2 if learn_sigma else 1)
    shapes.update(
        {
            "final_layer.linear.weight": (out, d),
            "final_layer.linear.bias": (out,),
            "final_layer.adaLN_modulation.1.weight": (2 * d, d),
            "final_layer.adaLN_modulation.1.bias": (2 * d,),
        }
    )
    sd = {k: torch.randn(s, generator=g) / math.sqrt(s[-1] if len(s) > 1 else 4) for k, s in shapes.items()}
    return {"pos_embed": ref_pos_embed(d, grid), **sd}


def _lin(sd: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _ln(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def ref_block(sd: dict[str, Tensor], p: str, x: Tensor, c: Tensor, heads: int) -> Tensor:
    shift1, scale1, gate1, shift2, scale2, gate2 = _lin(sd, f"{p}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
    b, n, d = x.shape
    h = _ln(x) * (1 + scale1[:, None]) + shift1[:, None]
    q, k, v = _lin(sd, f"{p}.attn.qkv", h).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1)  # (B, H, N, N)
    x = x + gate1[:, None] * _lin(sd, f"{p}.attn.proj", (att @ v).transpose(1, 2).reshape(b, n, d))
    h = _ln(x) * (1 + scale2[:, None]) + shift2[:, None]
    return x + gate2[:, None] * _lin(sd, f"{p}.mlp.fc2", F.gelu(_lin(sd, f"{p}.mlp.fc1", h), approximate="tanh"))


def ref_forward(
    sd: dict[str, Tensor],
    x: Tensor,
    t: Tensor,
    y: Tensor | None,
    *,
    heads: int,
    iters: int = 0,
    prepost_timestep: bool = False,
) -> Tensor:
    """The official forward pass (FPDM when block_fixed_point.* exists, else DiT), straight from the tensors."""
    w = sd["x_embedder.proj.weight"]
    p = w.shape[-1]
    h = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)  # fp32, as the official code
    args = t.float()[:, None] * freqs[None]  # (B, 128)
    t_freq = torch.cat([args.cos(), args.sin()], dim=1).to(x)  # (B, 256), cos first
    t_emb = _lin(sd, "t_embedder.mlp.2", F.silu(_lin(sd, "t_embedder.mlp.0", t_freq)))  # (B, D)
    y_emb = sd["y_embedder.embedding_table.weight"][y] if y is not None else None
    c = t_emb if y_emb is None else t_emb + y_emb
    if "block_fixed_point.attn.qkv.weight" in sd:
        c_pp = c if prepost_timestep or y_emb is None else y_emb
        for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks_pre.")})):
            h = ref_block(sd, f"blocks_pre.{i}", h, c_pp, heads)
        u, z = _lin(sd, "block_pre_projection", h), h
        for _ in range(iters):
            inner = F.gelu(_lin(sd, "block_fixed_point_projection_fc1", torch.cat([z, u], dim=-1)), approximate="tanh")
            z = ref_block(sd, "block_fixed_point", _lin(sd, "block_fixed_point_projection_fc2", inner), c, heads)
        h = z
        for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks_post.")})):
            h = ref_block(sd, f"blocks_post.{i}", h, c_pp, heads)
        c_final = c_pp
    else:
        for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
            h = ref_block(sd, f"blocks.{i}", h, c, heads)
        c_final = c
    shift, scale = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(c_final)).chunk(2, dim=1)
    out = _lin(sd, "final_layer.linear", _ln(h) * (1 + scale[:, None]) + shift[:, None])  # (B, T, p*p*C)
    g = math.isqrt(out.shape[1])
    ch = out.shape[-1] // (p * p)
    out = out.reshape(-1, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return out.reshape(-1, ch, g * p, g * p)


def parity(
    run,
    sd: dict[str, Tensor],
    *,
    heads: int,
    iters: int,
    prepost_timestep: bool = False,
    classes: int = 5,
    ema: bool = True,
) -> float:
    """Max abs difference between the imported model and the reference, in float64."""
    model = load_denoiser(load_checkpoint(run), ema=ema, registry=REGISTRY).double()
    size = model.input_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, size, size, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([0, classes - 1, classes]) if classes else None  # the last one is the CFG null label
    solver = REGISTRY.create("solver", "fixed_point")
    with torch.no_grad():
        ours = model(x, t, y, iters=iters, solver=solver, tol=0.0).pred
        ref = ref_forward(
            {k: v.double() for k, v in sd.items()}, x, t, y, heads=heads, iters=iters, prepost_timestep=prepost_timestep
        )
    assert ours.shape == ref.shape
    assert ref.abs().max() > 0.1  # the check has teeth: the output is not ~0
    return (ours - ref).abs().max().item()


def save_official(path, sd_model, sd_ema=None, **args) -> None:  # type: ignore[no-untyped-def]
    """The official train.py's file: model, ema, optimizer state, args (an argparse.Namespace) and the step."""
    torch.save(
        {
            "model": sd_model,
            "ema": sd_ema if sd_ema is not None else sd_model,
            "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "args": argparse.Namespace(**args),
            "train_steps": 1234,
        },
        path,
    )


# ---------------------------------------------------------------------------------------------------------
# Parity


def test_reference_pos_embed_is_fpdms():
    assert torch.allclose(sincos_pos_embed(32, 4)[None], ref_pos_embed(32, 4), atol=1e-6)


@pytest.mark.slow
def test_fpdm_cli_import_matches_the_reference_forward(tmp_path):
    sd_model = official_state_dict(fpdm=True, hidden=32, pre=2, post=1, seed=0)
    sd_ema = official_state_dict(fpdm=True, hidden=32, pre=2, post=1, seed=1)
    src = tmp_path / "0001234.pt"
    save_official(
        src,
        sd_model,
        sd_ema,
        model="DiT-S/2",
        fixed_point=True,
        image_size=64,
        fixed_point_pre_post_timestep_conditioning=True,
    )
    one_line_error(run_cli("import-official", str(src), str(tmp_path / "x")), "num_heads")  # width 32: heads unknown
    assert not (tmp_path / "x").exists()
    run = tmp_path / "run"
    r = run_cli("import-official", str(src), str(run), "--set", "model.num_heads=2")
    assert r.returncode == 0, r.stderr
    assert "checkpoint:" in r.stdout
    ckpt = load_checkpoint(run)
    assert ckpt.step == 1234 and ckpt.path.parent == run / "checkpoints"
    assert not (ckpt.path / "optimizer.pt").exists()
    config = from_dict(Config, ckpt.config)
    assert config.model.arch == "FPDM-XS/2" and (config.model.pre_depth, config.model.post_depth) == (2, 1)
    assert config.model.prepost_timestep and config.data.name == "latents" and config.data.image_size == 8
    assert config.solver.max_iter == 25 and config.diffusion.prediction == "eps" and config.model.learn_sigma
    assert ckpt.spec["denoiser"] == "fpdm" and ckpt.spec["latent"] == {"scale_factor": 0.18215}
    assert ckpt.spec["options"]["num_classes"] == 5 and ckpt.spec["class_names"] == []
    for name, sd in (("model", sd_model), ("ema", sd_ema)):  # both sets kept, in their own files
        saved = load_file(ckpt.path / f"{name}.safetensors")
        assert saved.keys() == sd.keys() and all(torch.equal(saved[k], sd[k]) for k in sd)
    PARITY["fpdm cli, ema, prepost"] = err = parity(run, sd_ema, heads=2, iters=3, prepost_timestep=True)
    assert err < 1e-10
    PARITY["fpdm cli, model, prepost"] = err = parity(run, sd_model, heads=2, iters=0, prepost_timestep=True, ema=False)
    assert err < 1e-10
    with pytest.raises(UsageError, match="cannot resume"):
        ckpt.training_state()


def test_plain_state_dict_with_wrapper_prefixes_imports_in_python(tmp_path):
    sd = official_state_dict(fpdm=True, hidden=64, grid=4, classes=3, seed=2)
    src = tmp_path / "plain.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, src)
    result = import_official(src, tmp_path / "run", overrides=["model.num_heads=4"], registry=REGISTRY, log=print)
    assert result.arch == "FPDM-XS/2" and result.spec["options"]["num_heads"] == 4
    assert not result.config["model"]["prepost_timestep"]  # the official default without args
    PARITY["fpdm plain, class-only pre/post"] = err = parity(result.run_dir, sd, heads=4, iters=5, classes=3)
    assert err < 1e-10


def test_dit_imports_and_matches_the_reference(tmp_path):
    sd = official_state_dict(fpdm=False, hidden=32, depth=3, classes=4, learn_sigma=False, seed=3)
    src = tmp_path / "dit.pt"
    torch.save({"ema": sd, "args": argparse.Namespace(model="DiT-B/4", predict_v=True)}, src)
    result = import_official(src, tmp_path / "run", overrides=["model.num_heads=4"], registry=REGISTRY)
    config = from_dict(Config, result.config)
    assert result.spec["denoiser"] == "dit" and config.model.depth == 3 and not config.model.learn_sigma
    assert config.diffusion.prediction == "v"
    PARITY["dit"] = err = parity(result.run_dir, sd, heads=4, iters=0, classes=4)
    assert err < 1e-10


def _layout(section: str) -> dict[str, tuple[int, ...]]:
    text = LAYOUT.read_text().split(f"## {section}")[1].split("##")[0]
    rows = re.findall(r"^(\S+)\t\(([\d, ]*)\)", text, flags=re.M)
    return {k: tuple(int(n) for n in s.split(",") if n.strip()) for k, s in rows}


@pytest.mark.slow
@pytest.mark.skipif(not LAYOUT.exists(), reason="shared/official_state_dict_layout.txt not present")
@pytest.mark.parametrize("fpdm", [True, False], ids=["FPDM-S/2", "DiT-S/2"])
def test_s2_layout_file_imports_with_heads_from_args(tmp_path, fpdm):
    sd = official_state_dict(fpdm=fpdm, hidden=384, grid=16, classes=1000, depth=12, seed=4)
    listed = _layout("FPDM" if fpdm else "DiT")
    shown = {k: tuple(v.shape) for k, v in sd.items() if not re.match(r"blocks\.([1-9]|1\d)\.", k)}
    assert shown == listed  # the test's state dict is the official layout, key for key
    src = tmp_path / "s2.pt"
    torch.save({"ema": sd, "args": argparse.Namespace(model="DiT-S/2", fixed_point=fpdm)}, src)
    result = import_official(src, tmp_path / "run", registry=REGISTRY)
    assert result.arch == ("FPDM-S/2" if fpdm else "DiT-S/2") and result.spec["options"]["num_heads"] == 6
    assert result.config["data"]["image_size"] == 32 and result.config["solver"]["max_iter"] == (26 if fpdm else 12)
    PARITY[result.arch] = err = parity(result.run_dir, sd, heads=6, iters=2, classes=1000)
    assert err < 1e-9


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


@pytest.mark.slow
def test_wrong_shape_missing_keys_and_wrong_arch_are_named(tmp_path):
    sd = official_state_dict(fpdm=True, hidden=32, seed=5)
    bad = dict(sd, **{"blocks_post.0.mlp.fc1.weight": torch.zeros(100, 32)})
    save_official(tmp_path / "shape.pt", bad)
    out = tmp_path / "out"
    one_line_error(
        run_cli("import-official", str(tmp_path / "shape.pt"), str(out), "--set", "model.num_heads=2"),
        "wrong shape",
        "blocks_post.0.mlp.fc1.weight (100, 32) vs (128, 32)",
    )
    missing = {k: v for k, v in sd.items() if k not in ("block_pre_projection.weight", "blocks_pre.0.attn.proj.bias")}
    torch.save(missing, tmp_path / "missing.pt")
    one_line_error(
        run_cli("import-official", str(tmp_path / "missing.pt"), str(out), "--set", "model.num_heads=2"),
        "missing 2",
        "block_pre_projection.weight",
        "blocks_pre.0.attn.proj.bias",
    )
    named = r"does not fit DiT-S/2: missing 120: blocks\.0\..*unexpected 34: blocks_pre\.0"
    with pytest.raises(UsageError, match=named):
        import_official(tmp_path / "missing.pt", out, arch="DiT-S/2", registry=REGISTRY)
    assert not out.exists()


class Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))  # type: ignore[attr-defined]


class Custom:
    pass


@pytest.mark.slow
def test_files_that_need_code_are_refused(tmp_path):
    sd = official_state_dict(fpdm=True, hidden=32, seed=6)
    torch.save({"model": sd, "extra": Custom()}, tmp_path / "custom.pt")
    payload = Payload()
    payload.marker = tmp_path / "pwned"  # type: ignore[attr-defined]
    torch.save({"ema": sd, "x": payload}, tmp_path / "payload.pt")
    for name in ("custom.pt", "payload.pt"):
        line = one_line_error(
            run_cli("import-official", str(tmp_path / name), str(tmp_path / "out")), "not a plain state dict", "refused"
        )
        assert "Custom" in line or "system" in line
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.slow
def test_foreign_and_missing_files_and_bad_out(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    one_line_error(
        run_cli("import-official", str(tmp_path / "notes.txt"), str(tmp_path / "o")), "not a torch checkpoint"
    )
    one_line_error(run_cli("import-official", str(tmp_path / "nope.pt"), str(tmp_path / "o")), "not found")
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(UsageError, match="neither a state dict"):
        import_official(tmp_path / "odd.pt", tmp_path / "o")
    sd = official_state_dict(fpdm=True, hidden=32, seed=7)
    torch.save({"ema": sd}, tmp_path / "ema.pt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an fpdm run"):
        import_official(tmp_path / "ema.pt", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="no 'model' weights"):
        import_official(tmp_path / "ema.pt", tmp_path / "o", weights="model", overrides=["model.num_heads=2"])
    assert not (tmp_path / "o").exists()


def test_only_model_weights_fall_back_with_a_note_and_a_run_is_replaced(tmp_path, capsys):
    sd = official_state_dict(fpdm=True, hidden=32, seed=8)
    torch.save({"model": sd, "args": {"model": "DiT-S/2"}}, tmp_path / "m.pt")  # args as the FPDM fork saves them
    for _ in range(2):  # the second import replaces the first run
        result = import_official(
            tmp_path / "m.pt", tmp_path / "run", overrides=["model.num_heads=2"], registry=REGISTRY
        )
    assert "no 'ema' weights" in capsys.readouterr().out
    assert result.weights == "'model' (model and ema)"
    ema = load_file(result.checkpoint / "ema.safetensors")
    assert all(torch.equal(ema[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------------------
# The imported model samples


def test_imported_checkpoint_samples(tmp_path):
    sd = official_state_dict(fpdm=True, hidden=32, seed=9)
    save_official(tmp_path / "o.pt", sd, model="DiT-S/2", fixed_point=True)
    result = import_official(tmp_path / "o.pt", tmp_path / "run", overrides=["model.num_heads=2"], registry=REGISTRY)
    ckpt = load_checkpoint(result.run_dir)
    config = from_dict(Config, ckpt.config)
    model = load_denoiser(ckpt, registry=REGISTRY)
    schedule = build_schedule(config.diffusion, REGISTRY)
    diffusion = GaussianDiffusion(
        schedule, prediction=config.diffusion.prediction, learn_sigma=config.model.learn_sigma
    )
    timesteps = sorted(schedule.sampling_timesteps(3).tolist())
    out = generate(
        model,
        diffusion.respace(timesteps),
        n=2,
        batch_size=2,
        seed=0,
        labels=[0, 4],
        shape=(4, 8, 8),
        sampler=REGISTRY.create("sampler", "ddpm"),
        solver=REGISTRY.create("solver", "fixed_point"),
        iterations=[2, 2, 2],
        reuse=REGISTRY.create("reuse_policy", "reuse"),
        cfg_scale=2.0,
    )
    assert out.images.shape == (2, 4, 8, 8) and torch.isfinite(out.images).all()
    assert out.blocks.tolist() == [3 * (1 + 2 + 1)] * 2


def test_report_parity(capsys):
    with capsys.disabled():
        for case, err in PARITY.items():
            print(f"\nparity {case}: max abs error {err:.3e} (float64)")


@pytest.mark.slow
def test_imported_checkpoint_samples_through_a_vae_and_exports(tmp_path):
    """The issue's end to end: an official checkpoint imported, sampled with `fpdm sample --vae` (decoded to
    RGB), exported with `fpdm export --onnx`, and the export sampled with ONNX Runtime through the same VAE."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    from PIL import Image

    from fpdm.io.vae_weights import save_vae
    from fpdm.models.vae import AutoencoderKL, VAEConfig

    vae = save_vae(
        AutoencoderKL(VAEConfig(block_out_channels=(32, 32), norm_num_groups=8, latent_channels=4)), tmp_path / "vae"
    )
    save_official(tmp_path / "o.pt", official_state_dict(fpdm=True, hidden=32, seed=3), model="DiT-S/2")
    assert (
        run_cli(
            "import-official", str(tmp_path / "o.pt"), str(tmp_path / "run"), "--set", "model.num_heads=2"
        ).returncode
        == 0
    )
    done = run_cli(
        "sample",
        str(tmp_path / "run"),
        "--n",
        "2",
        "--steps",
        "2",
        "--iters",
        "2",
        "--class",
        "3",
        "--vae",
        str(vae),
        "--no-progress",
        "--out",
        str(tmp_path / "s"),
    )
    assert done.returncode == 0, done.stderr
    image = Image.open(tmp_path / "s" / "images" / "000000.png")
    assert image.mode == "RGB" and image.size == (16, 16)  # 8x8 latents, decoded 2x up by this two-level VAE
    onnx_path = tmp_path / "m.onnx"
    done = run_cli("export", str(tmp_path / "run"), "--onnx", "--iters", "2", "--out", str(onnx_path))
    assert done.returncode == 0, done.stderr
    done = run_cli(
        "sample",
        str(onnx_path),
        "--n",
        "2",
        "--steps",
        "2",
        "--class",
        "3",
        "--vae",
        str(vae),
        "--no-progress",
        "--out",
        str(tmp_path / "o"),
    )
    assert done.returncode == 0, done.stderr
    for k in range(2):
        a = torch.from_numpy(np.asarray(Image.open(tmp_path / "s" / "images" / f"00000{k}.png"), dtype=np.float32))
        b = torch.from_numpy(np.asarray(Image.open(tmp_path / "o" / "images" / f"00000{k}.png"), dtype=np.float32))
        assert (a - b).abs().max() <= 1  # the same images through both backends, to a rounding step
