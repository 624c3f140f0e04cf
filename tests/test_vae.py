"""The SD-VAE (diffusers AutoencoderKL layout): shapes, scaling, the folder format, legacy keys, errors, and
parity with diffusers itself when it is importable (it is not an fpdm dependency)."""

from __future__ import annotations

import json

import pytest
import torch

from fpdm.errors import UsageError
from fpdm.io.vae_weights import convert_state_dict, load_vae, save_vae, vae_config_to_dict
from fpdm.models.vae import AutoencoderKL, VAEConfig

TINY = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4}


def tiny_vae(**overrides) -> AutoencoderKL:  # type: ignore[no-untyped-def]
    vae = AutoencoderKL(VAEConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # away from the init (GroupNorm at 1/0, zero biases) so every weight matters
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


def test_shapes_and_scaling():
    vae = tiny_vae()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = vae.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 8, 8)  # one halving for two blocks
    assert vae.decode(posterior.mean).shape == (2, 3, 16, 16)
    latents = vae.encode_latents(x)
    torch.testing.assert_close(latents, posterior.mean * 0.18215)
    images = vae.decode_latents(latents)
    torch.testing.assert_close(images, vae.decode(posterior.mean).clamp(-1, 1))
    assert images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(vae.decode_latents(latents * 2, scale_factor=2 * 0.18215), images)
    gen = torch.Generator().manual_seed(3)
    drawn = vae.encode_latents(x, sample=True, generator=gen)
    assert drawn.shape == latents.shape and not torch.equal(drawn, latents)


def test_shift_factor_round_trips():
    vae = tiny_vae(shift_factor=0.5, scaling_factor=0.25)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    mean = vae.encode(x).mean
    torch.testing.assert_close(vae.encode_latents(x), (mean - 0.5) * 0.25)
    torch.testing.assert_close(vae.decode_latents(vae.encode_latents(x)), vae.decode(mean).clamp(-1, 1))


def test_bad_input_shapes_are_usage_errors():
    vae = tiny_vae()
    with pytest.raises(UsageError, match="multiples of 2"):
        vae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(UsageError, match="latents"):
        vae.decode(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("layout", ["flat", "pipeline", "bin"])
def test_save_and_load_round_trip(tmp_path, layout):
    vae = tiny_vae()
    folder = tmp_path / ("pipe/vae" if layout == "pipeline" else "vae")
    save_vae(vae, folder)
    if layout == "bin":
        from safetensors.torch import load_file

        weights = folder / "diffusion_pytorch_model.safetensors"
        torch.save(load_file(str(weights)), folder / "diffusion_pytorch_model.bin")
        weights.unlink()
    loaded = load_vae(tmp_path / "pipe" if layout == "pipeline" else folder)
    assert loaded.config == vae.config and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(x), vae(x), rtol=0, atol=0)


def test_state_dict_keys_are_diffusers_names():
    keys = set(tiny_vae().state_dict())
    for key in (
        "encoder.conv_in.weight",
        "encoder.down_blocks.0.resnets.0.norm1.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.mid_block.attentions.0.group_norm.weight",
        "encoder.mid_block.attentions.0.to_out.0.bias",
        "encoder.mid_block.resnets.1.conv2.weight",
        "encoder.conv_norm_out.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up_blocks.1.resnets.1.conv2.weight",
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.conv_out.bias",
    ):
        assert key in keys, key
    assert not any("downsamplers" in k for k in keys if k.startswith("encoder.down_blocks.1."))  # last: no resample
    assert not any("upsamplers" in k for k in keys if k.startswith("decoder.up_blocks.1."))


def test_optional_parts_follow_the_config():
    keys = set(tiny_vae(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False).state_dict())
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) or "attentions" in k for k in keys)


def test_legacy_attention_names_and_conv_weights_load(tmp_path):
    vae = tiny_vae()
    legacy = {}
    for key, value in vae.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value  # (C, C, 1, 1) as old conversions
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    converted = convert_state_dict(legacy)
    assert set(converted) == set(vae.state_dict())
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(vae_config_to_dict(vae.config)))
    save_file({k: v.contiguous() for k, v in legacy.items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(load_vae(tmp_path)(x), vae(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# Errors: one line, naming what is missing or wrong


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(UsageError) as exc:
        load_vae(tmp_path / "nope")
    assert "does not exist" in _one_line(exc) and "config.json" in _one_line(exc)
    with pytest.raises(UsageError) as exc:
        load_vae(tmp_path)
    assert "has no config.json (nor vae/config.json)" in _one_line(exc)
    (tmp_path / "config.json").write_text(json.dumps(vae_config_to_dict(VAEConfig(**TINY))))
    with pytest.raises(UsageError) as exc:
        load_vae(tmp_path)
    assert "no diffusion_pytorch_model.safetensors (nor diffusion_pytorch_model.bin)" in _one_line(exc)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is not a folder"):
        load_vae(tmp_path / "file")


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"act_fn": "gelu"}, "act_fn='gelu'"),
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "AttnDownEncoderBlock2D"),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "1 up_block_types for 2"),
        ({"latents_mean": [0.0] * 4}, "latents_mean"),
        ({"use_tiling": True}, "unsupported AutoencoderKL option(s) use_tiling"),
        ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
        ({"norm_num_groups": 5}, "not divisible by norm_num_groups=5"),
        ({"block_out_channels": []}, "block_out_channels"),
    ],
)
def test_config_errors_name_the_option(tmp_path, change, needle):
    vae = save_vae(tiny_vae(), tmp_path)
    raw = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(UsageError) as exc:
        load_vae(vae)
    assert needle in _one_line(exc)


def test_weights_that_do_not_fit_the_config(tmp_path):
    save_vae(tiny_vae(), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "latent_channels": 8}))
    with pytest.raises(UsageError) as exc:
        load_vae(tmp_path)
    assert "does not fit its config.json" in _one_line(exc) and "shape" in _one_line(exc)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "layers_per_block": 2}))
    missing = r"lacks decoder\.up_blocks\.0\.resnets\.2\..* \(32 missing, 0 unexpected keys\)"
    with pytest.raises(UsageError, match=missing):
        load_vae(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UsageError, match="cannot read VAE weights"):
        load_vae(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Parity with diffusers (skipped when it is not importable, e.g. PYTHONPATH=/tmp/dscratch to run it)


def test_parity_with_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    kwargs = {
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
    }
    reference = diffusers.AutoencoderKL(**kwargs).eval()
    with torch.no_grad():
        for p in reference.parameters():  # away from diffusers' init (GroupNorm at 1/0, zero biases)
            p.add_(torch.randn_like(p) * 0.05)
    reference.save_pretrained(tmp_path / "ref")
    ours = load_vae(tmp_path / "ref")
    assert ours.config.scaling_factor == reference.config.scaling_factor
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = reference.encode(x).latent_dist
        posterior = ours.encode(x)
        torch.testing.assert_close(posterior.mean, expected.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(posterior.logvar, expected.logvar, rtol=1e-5, atol=1e-5)
        z = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(ours.decode(z), reference.decode(z).sample, rtol=1e-5, atol=1e-5)
    # and the other way: our folder loads in diffusers and computes the same
    mine = save_vae(tiny_vae(), tmp_path / "mine")
    theirs = diffusers.AutoencoderKL.from_pretrained(mine).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_vae(mine).decode(z), theirs.decode(z).sample, rtol=1e-5, atol=1e-5)
