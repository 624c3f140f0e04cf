"""The KL autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"), laid out as diffusers' `AutoencoderKL` so its `config.json` and weights load unchanged.

Encoder: conv_in -> down blocks (ResNet blocks, a stride-2 conv between resolutions) -> mid block (ResNet,
single-head self-attention, ResNet) -> GroupNorm + SiLU -> conv_out to 2 x latent channels (mean, log variance).
Decoder: the mirror image with nearest-neighbour x2 upsampling. 1x1 quant_conv / post_quant_conv sit between
them. Latents a diffusion model sees are `(sample - shift) * scaling_factor`, 0.18215 and no shift for SD's VAE.
Loading and saving (config.json + weights, legacy attention names) live in fpdm.vae_io; `load_vae` and
`save_vae` are re-exported here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch import Tensor, nn

from fpdm.errors import UsageError

ENCODER_BLOCK, DECODER_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
EPS = 1e-6  # every GroupNorm of the autoencoder


def _positive_ints(instance: Any, attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
    if not value or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in value):
        raise ValueError(f"'{attribute.name}' must be a non-empty list of positive integers, got {value!r}")


@attrs.frozen
class VAEConfig:
    """The subset of diffusers' AutoencoderKL config this implementation builds (defaults are diffusers')."""

    in_channels: int = attrs.field(default=3, validator=v.ge(1))
    out_channels: int = attrs.field(default=3, validator=v.ge(1))
    latent_channels: int = attrs.field(default=4, validator=v.ge(1))
    block_out_channels: tuple[int, ...] = attrs.field(default=(64,), converter=tuple, validator=_positive_ints)
    layers_per_block: int = attrs.field(default=1, validator=v.ge(1))
    norm_num_groups: int = attrs.field(default=32, validator=v.ge(1))
    sample_size: int = attrs.field(default=32, validator=v.ge(1))
    scaling_factor: float = attrs.field(default=0.18215, validator=v.gt(0.0))
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __attrs_post_init__(self) -> None:
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def downscale(self) -> int:
        """Image side / latent side: one halving per block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class LatentDistribution:
    """The encoder's diagonal Gaussian: mean and log variance, each (B, latent_channels, H/f, W/f)."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, *, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


# --------------------------------------------------------------------------------------------------------------
# Building blocks (attribute names are diffusers' state-dict keys)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a 1x1 conv shortcut when the width changes. No time embedding."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, GroupNorm first, residual added."""

    def __init__(self, channels: int, *, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, val = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, H*W, C)
        out = F.scaled_dot_product_attention(q, k, val).squeeze(1)  # (B, H*W, C)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + out


class Downsample(nn.Module):
    """Stride-2 conv3x3 after padding one zero row/column at the bottom/right (diffusers' padding=0 form)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class ResampleBlock(nn.Module):
    """`resnets`, then an optional resampler: DownEncoderBlock2D (`downsamplers`), UpDecoderBlock2D (`upsamplers`)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, layers: int, groups: int, down: bool, resample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups=groups) for i in range(layers)
        )
        sampler = nn.ModuleList([Downsample(out_channels) if down else Upsample(out_channels)]) if resample else None
        self.downsamplers = sampler if down else None
        self.upsamplers = None if down else sampler

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for sampler in self.downsamplers or self.upsamplers or ():
            x = sampler(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, *, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups=groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups=groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            ResampleBlock(
                widths[max(i - 1, 0)],
                width,
                layers=config.layers_per_block,
                groups=groups,
                down=True,
                resample=i < len(widths) - 1,
            )
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups=groups, attention=config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h = block(h)  # (B, C_last, H/f, W/f) after the last
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2 * latent, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups=groups, attention=config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            ResampleBlock(
                widths[max(i - 1, 0)],
                width,
                layers=config.layers_per_block + 1,
                groups=groups,
                down=False,
                resample=i < len(widths) - 1,
            )
            for i, width in enumerate(widths)
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for block in self.up_blocks:
            h = block(h)  # (B, C0, h*f, w*f) after the last
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, H, W)


# --------------------------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] (B, in_channels, H, W) <-> latents (B, latent_channels, H/f, W/f), f = 2^(blocks - 1).

    `encode`/`decode` work on raw latents; `encode_latents`/`decode_latents` apply the scaling (and shift) so
    their latents are what a latent diffusion model is trained on. H and W must be multiples of f.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    def encode(self, x: Tensor) -> LatentDistribution:
        f = self.config.downscale
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise UsageError(
                f"the VAE encodes (B, {self.config.in_channels}, H, W) images with H and W multiples of "
                f"{f}, got {tuple(x.shape)}"
            )
        moments = self.encoder(x)  # (B, 2 * latent, H/f, W/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)  # (B, latent, H/f, W/f) each
        return LatentDistribution(mean, logvar.clamp(-30.0, 20.0))  # diffusers' clamp keeps exp() finite

    def decode(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise UsageError(f"the VAE decodes (B, {self.config.latent_channels}, h, w) latents, got {tuple(z.shape)}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)  # (B, out_channels, h*f, w*f)

    def forward(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Reconstruction: decode the posterior mean (or a sample of it)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator=generator) if sample else posterior.mean)

    def encode_latents(
        self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images in [-1, 1] -> latents scaled for diffusion: (z - shift) * scaling_factor."""
        posterior = self.encode(images)
        z = posterior.sample(generator=generator) if sample else posterior.mean  # (B, latent, H/f, W/f)
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def decode_latents(self, latents: Tensor, *, scale_factor: float | None = None) -> Tensor:
        """Scaled latents -> images in [-1, 1]: decode(latents / scale + shift), clamped. `scale_factor`
        overrides the config's (a checkpoint records the scale its training latents carried)."""
        scale = self.config.scaling_factor if scale_factor is None else scale_factor
        z = latents / scale + (self.config.shift_factor or 0.0)
        return self.decode(z).clamp(-1.0, 1.0)
