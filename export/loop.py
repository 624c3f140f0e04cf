"""The whole sampling loop as one traceable module: S steps, each with its unrolled solve, for runtimes that
want one call per image batch (`fpdm export --onnx --whole-loop --steps S`).

It walks the same path as `fpdm.diffusion.sampling.sample`, built from the same pieces (the step update, the reuse
policy, guidance, the per-step iteration plan), with the random draws moved to inputs: x_T (B, C, H, W) and,
for samplers that add noise, noise (S, B, C, H, W), row s being the noise added after step s. Feeding the
draws `sample` makes from its per-sample generators reproduces its images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.interfaces import Denoiser, ReusePolicy, Solver
from fpdm.diffusion.sampling import StepUpdate, guide

from fpdm.export.onnx import is_fixed_point, unrolled_call


class SamplingLoop(nn.Module):
    def __init__(self, model: Denoiser, diffusion: GaussianDiffusion, *, update: StepUpdate, solver: Solver | None,
                 iterations: Sequence[int], reuse: ReusePolicy, cfg_scale: float = 1.0,
                 cfg_channels: int | None = None, clip_x0: bool = False, clip_output: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model, self.diffusion, self.update, self.solver = model, diffusion, update, solver
        self.iterations, self.reuse = list(iterations), reuse
        self.cfg_scale, self.cfg_channels = cfg_scale, cfg_channels
        self.clip_x0, self.clip_output, self.dtype = clip_x0, clip_output, dtype
        self.fixed_point = is_fixed_point(model)

    def forward(self, x_T: Tensor, y: Tensor | None = None, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(images (B, C, H, W) in [-1, 1] (latents: unclipped), residual (S, B) of each step's last iteration,
        zeros for a DiT)."""
        steps = self.diffusion.num_timesteps
        guided = self.cfg_scale != 1.0
        x, n = x_T, x_T.shape[0]
        y_in = torch.cat([y, torch.full_like(y, self.model.num_classes)]) if guided and y is not None else y
        solutions: list[Tensor] = []
        residuals = []
        for step, i in enumerate(reversed(range(steps))):
            t_model = self.diffusion.map_timesteps(torch.full((n,), i, dtype=torch.long, device=x.device))
            x_in, t_in = (torch.cat([x, x]), torch.cat([t_model, t_model])) if guided else (x, t_model)
            z0 = self.reuse.init(solutions, step)
            pred, z, residual = unrolled_call(self.model, self.solver, self.iterations[step], x_in.to(self.dtype),
                                              t_in, y_in, z0)
            if z is not None and self.reuse.history:
                solutions = [*solutions, z][-self.reuse.history :]
            output = pred.float()
            if guided:
                output = guide(output, self.cfg_scale, channels=self.cfg_channels,
                               learn_sigma=self.diffusion.learn_sigma)
            added = noise[step] if noise is not None and i > 0 else torch.zeros_like(x)
            x = self.update(self.diffusion, output, x, i, noise=added, clip_x0=self.clip_x0)
            residuals.append(residual[:n] if residual is not None else torch.zeros(n, device=x.device))
        images = x.clamp(-1, 1) if self.clip_output else x  # latents are not clipped: the VAE decodes them later
        return images, torch.stack(residuals)  # (B, C, H, W), (S, B)
