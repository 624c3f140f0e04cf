"""The model evaluation every sampler calls: guidance, the warm-started fixed-point solve, the prediction
conversion, the block accounting, the per-evaluation stats and the divergence check, in one place.

A `ModelEvaluation` is made for one sampling run and dropped with it: it holds the run's fixed-point
solutions (for the reuse policy), the iterations each sample has not spent yet (adaptive budgets) and what the
run spent. It solves one of two ways, chosen at construction:
- "solving": the denoiser's own call, i.e. `solver.solve` with the tolerance and per-sample caps (eager);
- "unrolled": `solver.unrolled` with exactly the planned count and no host syncs, traceable (export).
Eager sampling and the exported whole loop therefore run the same sampler over the same evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from fpdm.diffusion.gaussian import GaussianDiffusion
from fpdm.errors import FpdmRuntimeError, PluginError, UsageError
from fpdm.interfaces import Denoised, Denoiser, DenoiserOutput, FixedPointDenoiser, ReusePolicy, Solver
from fpdm.solving.iterative import relative_residual

SolveMode = Literal["solving", "unrolled"]


@dataclasses.dataclass(frozen=True)
class StepStats:
    """What one model evaluation spent (one per sampling step for one-evaluation samplers), batch aggregates."""

    index: int  # the evaluation's position in the run
    timestep: float  # the model timestep (fractional under karras spacing)
    iterations: int  # allocated (the cap)
    iterations_mean: float  # spent
    iterations_max: int
    residual_mean: float  # final relative residual of the fixed-point solve
    residual_max: float
    blocks_mean: float


def guide(output: Tensor, scale: float, *, channels: int | None, learn_sigma: bool, rescale: float = 0.0) -> Tensor:
    """Classifier-free guidance on a batch of conditional rows followed by the same rows unconditioned:
    uncond + scale * (cond - uncond) on the prediction channels (or the first `channels`); the learned
    variance channels stay conditional. (B2, C_out, H, W) -> (B, C_out, H, W).

    `rescale` (phi) is Lin et al. 2023's guidance rescale (sec. 3.4): the guided prediction is scaled to the
    conditional one's per-sample standard deviation, then mixed back, phi * rescaled + (1 - phi) * guided;
    it counters the over-exposure that large scales give under zero-terminal-SNR schedules."""
    half = output.shape[0] // 2
    cond, uncond = output[:half], output[half:]  # slices, not chunk(): chunk pins the batch size when exported
    k = channels or (cond.shape[1] // 2 if learn_sigma else cond.shape[1])
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    if rescale:
        dims = tuple(range(1, guided.dim()))
        ratio = cond[:, :k].std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
        guided = rescale * guided * ratio + (1.0 - rescale) * guided
    return torch.cat([guided, cond[:, k:]], dim=1)


def unrolled_call(
    model: Denoiser,
    x: Tensor,
    t: Tensor,
    y: Tensor | None,
    *,
    solver: Solver | None,
    iters: int,
    z0: Tensor | None = None,
    use_z0: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The denoiser with `solver.unrolled` in place of its solve: (pred, z, residual of the last iteration (B,)).

    z0 None is the cold start (the pre-layer output); with `use_z0` (B,) in {0, 1}, row b starts from z0 where
    use_z0 is 1 and cold where it is 0, so one graph serves both. A denoiser without a fixed point returns
    (pred, None, None)."""
    if not isinstance(model, FixedPointDenoiser):
        return model(x, t, y, iters=0).pred, None, None  # (B, C_out, H, W)
    if solver is None or iters < 1:
        raise UsageError("an FPDM step needs a solver and iters >= 1")
    problem = model.prepare(x, t, y)
    h = problem.start  # (B, T, D)
    start = h
    if z0 is not None:
        start = z0.to(h.dtype) if use_z0 is None else h + use_z0.to(h.dtype)[:, None, None] * (z0.to(h.dtype) - h)
    last: dict[str, Tensor] = {}

    def f_seen(z: Tensor) -> Tensor:  # remembers the last evaluation for the residual output
        last["z"], last["fz"] = z, problem.f(z)
        return last["fz"]

    z = solver.unrolled(f_seen, start, iters=iters)  # (B, T, D)
    return model.finish(z, problem), z, relative_residual(last["z"], last["fz"])


class ModelEvaluation:
    """`evaluate(x, t) -> Denoised` for one sampling run (the `fpdm.interfaces.Evaluate` protocol).

    iterations[k] and tol[k] are the cap and stopping tolerance of the run's k-th evaluation (a plan per
    evaluation, not per step). With `adaptive`, each sample carries the iterations it did not use into its next
    evaluation. cfg_channels limits guidance to the first channels (the official code guides 3 of 4).
    `dtype` is the compute dtype of an exported graph (inputs cast to it, outputs back to x's dtype).
    After the run: `spent` (B,) blocks per sample and `history` (StepStats per evaluation) when solving;
    `residuals` (the last iteration's, (B,) per evaluation) and `blocks` (per sample) when unrolled.
    """

    def __init__(
        self,
        model: Denoiser,
        diffusion: GaussianDiffusion,
        *,
        labels: Tensor | None,
        solver: Solver | None,
        iterations: Sequence[int],
        reuse: ReusePolicy,
        tol: float | Sequence[float] = 0.0,
        adaptive: bool = False,
        cfg_scale: float = 1.0,
        cfg_channels: int | None = None,
        guidance_rescale: float = 0.0,
        clip_x0: bool = False,
        solve: SolveMode = "solving",
        dtype: torch.dtype | None = None,
        callback: Callable[[StepStats], None] | None = None,
    ) -> None:
        if solve not in ("solving", "unrolled"):
            raise UsageError(f"solve must be 'solving' or 'unrolled', got {solve!r}")
        self.iterations = list(iterations)
        self.tols = [float(tol)] * len(self.iterations) if isinstance(tol, (int, float)) else list(tol)
        if len(self.tols) != len(self.iterations):
            raise UsageError(f"{len(self.tols)} tolerances for {len(self.iterations)} model evaluations")
        self.guided = cfg_scale != 1.0
        if self.guided and labels is None:
            raise UsageError("classifier-free guidance needs a class-conditional model")
        self.model, self.diffusion, self.solver, self.reuse = model, diffusion, solver, reuse
        self.adaptive, self.cfg_scale, self.cfg_channels, self.clip_x0 = adaptive, cfg_scale, cfg_channels, clip_x0
        self.guidance_rescale = guidance_rescale
        self.unrolled, self.dtype, self.callback = solve == "unrolled", dtype, callback
        # One batch when guided: the conditional rows, then the same rows with the null label.
        self.y = labels
        if self.guided and labels is not None:
            self.y = torch.cat([labels, torch.full_like(labels, model.num_classes)])  # (2B,)
        self.evaluations = 0
        self.history: list[StepStats] = []
        self.residuals: list[Tensor] = []
        self.spent: Tensor | None = None
        self.blocks = 0
        self._solutions: list[Tensor] = []  # at most reuse.history of them
        self._levels: list[float] = []  # the model timestep each of _solutions was found at
        self._carry: Tensor | None = None
        self._last: tuple[int, float, DenoiserOutput] | None = None  # (index, timestep, output) for messages

    def __call__(self, x: Tensor, t: int) -> Denoised:
        k = self.evaluations
        if k >= len(self.iterations):
            raise PluginError(f"the sampler asked for model evaluation {k + 1}; the plan has {len(self.iterations)}")
        self.evaluations += 1
        n = x.shape[0]
        index = torch.full((n,), t, dtype=torch.long, device=x.device)  # (B,) into the respaced process
        t_model = self.diffusion.map_timesteps(index)  # (B,) the training timesteps the model knows (maybe float)
        x_in, t_in = (torch.cat([x, x]), torch.cat([t_model, t_model])) if self.guided else (x, t_model)
        level = self.diffusion.timestep_values[t]
        z0 = self.reuse.warm_start(self._solutions, k, levels=self._levels, level=level)
        if self.unrolled:
            pred, z = self._unrolled(x_in, t_in, z0, k, n)
        else:
            pred, z = self._solving(x, x_in, t_in, z0, k, level)
        if z is not None and self.reuse.history:
            self._solutions = [*self._solutions, z][-self.reuse.history :]
            self._levels = [*self._levels, level][-self.reuse.history :]
        output = pred.to(x.dtype)
        if self.guided:
            output = guide(
                output,
                self.cfg_scale,
                channels=self.cfg_channels,
                learn_sigma=self.diffusion.learn_sigma,
                rescale=self.guidance_rescale,
            )
        return self._denoised(output, x, index, zero_snr=self.diffusion.ac_values[t] == 0)

    def _unrolled(self, x_in: Tensor, t_in: Tensor, z0: Tensor | None, k: int, n: int) -> tuple[Tensor, Tensor | None]:
        iters = self.iterations[k]
        x_model = x_in if self.dtype is None else x_in.to(self.dtype)
        pred, z, residual = unrolled_call(self.model, x_model, t_in, self.y, solver=self.solver, iters=iters, z0=z0)
        self.residuals.append(residual[:n] if residual is not None else torch.zeros(n, device=x_in.device))
        self.blocks += self.model.blocks_per_call(iters)
        return pred, z

    def _solving(
        self, x: Tensor, x_in: Tensor, t_in: Tensor, z0: Tensor | None, k: int, timestep: float
    ) -> tuple[Tensor, Tensor | None]:
        n, cap = x.shape[0], self.iterations[k]
        if self._carry is None or self.spent is None:  # the batch is known from the first call on
            self._carry = torch.zeros(x_in.shape[0], dtype=torch.long, device=x.device)
            self.spent = torch.zeros(n, dtype=torch.long, device=x.device)
        limit = cap + self._carry if self.adaptive else cap  # adaptive: per-sample caps, what each has not spent
        with torch.no_grad():
            out = self.model(x_in, t_in, self.y, z0=z0, iters=limit, solver=self.solver, tol=self.tols[k])
        finite = torch.isfinite(x).all() & torch.isfinite(out.pred).all()
        if not bool(finite):  # NaN images are never returned as if they were samples
            self._diverge(x, k, timestep, out)
        if self.adaptive and out.stats is not None:
            self._carry = limit - out.stats.iterations
        blocks = out.blocks[:n]  # the unconditional rows of a guided batch are not counted (the paper's unit)
        self.spent = self.spent + blocks
        stats = _step_stats(k, timestep, cap, out, blocks)
        self.history.append(stats)
        self._last = (k, timestep, out)
        if self.callback is not None:
            self.callback(stats)
        return out.pred, out.z

    def _denoised(self, output: Tensor, x: Tensor, index: Tensor, *, zero_snr: bool) -> Denoised:
        d = self.diffusion
        pred, _ = d.split_output(output, x)
        x0 = d.predict_x0(pred, x, index)
        if not self.clip_x0:
            return Denoised(x0, d.predict_eps(pred, x, index), output)
        x0 = x0.clamp(-1, 1)
        if zero_snr:  # x is all noise, whatever x0 is
            return Denoised(x0, x, output)
        eps = (d.extract("sqrt_recip_alphas_cumprod", index, x) * x - x0) / d.extract(
            "sqrt_recipm1_alphas_cumprod", index, x
        )  # the noise consistent with the clamped x0
        return Denoised(x0, eps, output)

    def check_output(self, x: Tensor) -> None:
        """After the sampler returned x_0: every planned evaluation ran, and x_0 is finite (solving only)."""
        if self.evaluations != len(self.iterations):
            raise PluginError(
                f"the sampler made {self.evaluations} model evaluations; the plan has "
                f"{len(self.iterations)} (one per evaluation it declares)"
            )
        if not self.unrolled and not bool(torch.isfinite(x).all()):
            self._diverge(x, self.evaluations, 0, None)

    def _diverge(self, x: Tensor, k: int, timestep: float, out: DenoiserOutput | None) -> None:
        """Raise the one-line divergence message. A non-finite x coming in was made by the sampler's update
        after the previous evaluation: that evaluation is the one named."""
        if out is None or not bool(torch.isfinite(x).all()):
            if self._last is None:
                raise UsageError("the sampler's starting noise x_T is not finite")
            k, timestep, out = self._last
            where = "the sampler update"
        elif out.z is not None and not bool(torch.isfinite(out.z).all()):
            where = "the fixed-point state"
        else:
            where = "the model output"
        history = self.history[:k]
        residual = "no fixed-point solve"
        if out.stats is not None:
            r = out.stats.residual.double()
            worst = r.nan_to_num(nan=math.inf, posinf=math.inf).max().item() if r.numel() else math.nan
            residual = f"fixed-point residual max {worst:.3g}"
            if history:
                residual += f" (step before: {history[-1].residual_max:.3g})"
        raise FpdmRuntimeError(
            f"sampling diverged at model evaluation {k + 1} of {len(self.iterations)} (timestep {timestep:g}): "
            "non-finite values "
            f"in {where}, {residual}; no images written (try more iterations, a damped or another solver, or "
            "fewer steps)"
        )


def _step_stats(index: int, timestep: float, cap: int, out: DenoiserOutput, blocks: Tensor) -> StepStats:
    if out.stats is None:
        return StepStats(index, timestep, cap, 0.0, 0, float("nan"), float("nan"), blocks.double().mean().item())
    s = out.stats
    return StepStats(
        index,
        timestep,
        cap,
        s.iterations.double().mean().item(),
        int(s.iterations.max()),
        s.residual.double().nanmean().item(),
        s.residual.double().nan_to_num(nan=0.0).max().item(),
        blocks.double().mean().item(),
    )
