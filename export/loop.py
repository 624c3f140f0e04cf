"""The whole sampling loop as one traceable module: S steps, each with its unrolled solve, for runtimes that
want one call per image batch (`fpdm export --onnx --whole-loop --steps S`).

It runs the very sampler `fpdm.diffusion.sampling.sample` runs, over the same `ModelEvaluation` built in its
"unrolled" mode, with the random draws moved to inputs: x_T (B, C, H, W) and, for samplers that add noise,
noise (S, B, C, H, W), row k being the sampler's k-th draw (DDPM: the noise added after step k). Feeding the
draws `sample` makes from its per-sample generators reproduces its images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fpdm.diffusion.evaluation import ModelEvaluation
from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.diffusion.sampling import StepUpdate, TensorNoise, as_sampler
from fpdm.interfaces import Denoiser, ReusePolicy, Sampler, Solver


class SamplingLoop(nn.Module):
    """`forward(x_T, y, noise) -> (images, residual)`; everything else is fixed at construction."""

    def __init__(
        self,
        model: Denoiser,
        diffusion: GaussianDiffusion,
        *,
        sampler: Sampler | StepUpdate,
        solver: Solver | None,
        iterations: Sequence[int],
        reuse: ReusePolicy,
        cfg_scale: float = 1.0,
        cfg_channels: int | None = None,
        guidance_rescale: float = 0.0,
        clip_x0: bool = False,
        clip_output: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.model, self.diffusion, self.solver = model, diffusion, solver
        self.sampler = as_sampler(sampler, clip_x0=clip_x0)
        self.iterations, self.reuse = list(iterations), reuse
        self.cfg_scale, self.cfg_channels, self.guidance_rescale = cfg_scale, cfg_channels, guidance_rescale
        self.clip_x0, self.clip_output, self.dtype = clip_x0, clip_output, dtype

    def forward(self, x_T: Tensor, y: Tensor | None = None, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(images (B, C, H, W) in [-1, 1] (latents: unclipped), residual (E, B) of each evaluation's last
        iteration, zeros for a DiT)."""
        evaluate = ModelEvaluation(
            self.model,
            self.diffusion,
            labels=y,
            solver=self.solver,
            iterations=self.iterations,
            reuse=self.reuse,
            cfg_scale=self.cfg_scale,
            cfg_channels=self.cfg_channels,
            guidance_rescale=self.guidance_rescale,
            clip_x0=self.clip_x0,
            solve="unrolled",
            dtype=self.dtype,
        )
        x = self.sampler(evaluate, x_T, self.diffusion, noise=TensorNoise(noise, x_T))
        evaluate.check_output(x)
        images = x.clamp(-1, 1) if self.clip_output else x  # latents are not clipped: the VAE decodes them later
        return images, torch.stack(evaluate.residuals)  # (B, C, H, W), (E, B)
