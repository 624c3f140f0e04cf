"""FPDM and DiT denoisers built from the same DiT blocks.

FPDM: Bai & Melas-Kyriazi, "Fixed Point Diffusion Models", CVPR 2024 (arXiv 2401.08741).
DiT:  Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023.

Parameter names follow the official implementation's state dict (../shared/official_state_dict_layout.txt),
so an official checkpoint maps onto these modules key for key. Modules hold parameters only: the
fixed-point state comes in as `z0` and goes out in `DenoiserOutput.z`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from fpdm.errors import PluginError, UsageError
from fpdm.interfaces import Denoiser, DenoiserOutput, FixedPointDenoiser, FixedPointProblem, Solver, SolverResult

# name -> (hidden size, heads, DiT depth). S/B/L/XL as in DiT; XS and Ti are CPU-sized.
SIZES: dict[str, tuple[int, int, int]] = {
    "XS": (128, 4, 6),
    "Ti": (192, 3, 12),
    "S": (384, 6, 12),
    "B": (768, 12, 12),
    "L": (1024, 16, 24),
    "XL": (1152, 16, 28),
}
PATCHES = (2, 4, 8)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (B, T, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise UsageError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, hd), scale hd^-0.5
        return self.proj(out.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C_out)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, T, D), row-major over the grid


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        # The sinusoid stays fp32 (fp16 cannot resolve t * freq near t = 999); the MLP runs in its own dtype.
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(next(self.mlp.parameters()).dtype)  # (B, 256)
        return self.mlp(emb)  # (B, D), cos first


class LabelEmbedder(nn.Module):
    """Class table with one extra row (index num_classes) for the classifier-free-guidance null label."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)  # (B, D)


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE style), (grid*grid, dim): first half one axis, second the other."""
    coords = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # w first, as MAE
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def axis(pos: np.ndarray) -> np.ndarray:
        out = pos.reshape(-1)[:, None] * omega[None]  # (T, D/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (T, D/2)

    return torch.from_numpy(np.concatenate([axis(coords[0]), axis(coords[1])], axis=1)).float()


class _Backbone(Denoiser):
    """Embeddings, final layer, unpatchify and initialisation shared by FPDM and DiT."""

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        patch_size: int,
        hidden_size: int,
        num_heads: int,
        num_classes: int,
        learn_sigma: bool,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        if patch_size < 1 or input_size % patch_size:
            raise UsageError(f"input size {input_size} is not divisible by patch size {patch_size}")
        if num_classes < 0 or hidden_size % 4:
            raise UsageError("num_classes must be >= 0 and the hidden size a multiple of 4")
        self.input_size, self.in_channels, self.patch_size = input_size, in_channels, patch_size
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma, self.num_classes, self.hidden_size = learn_sigma, num_classes, hidden_size
        self.num_heads, self.mlp_ratio = num_heads, mlp_ratio
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes else None
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(hidden_size, grid).unsqueeze(0), persistent=True)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def block(self) -> DiTBlock:
        return DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio)

    def initialize(self) -> None:
        """The official initialisation: xavier linears with zero bias, N(0, 0.02) embeddings, adaLN-Zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.x_embedder.proj.bias is not None:  # always there; the Conv2d type allows none
            nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in self.t_embedder.mlp:  # its two linears, in order
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        for module in self.modules():
            last = module.adaLN_modulation[-1] if isinstance(module, (DiTBlock, FinalLayer)) else None
            if isinstance(last, nn.Linear):  # adaLN-Zero: every block starts as the identity
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed(self, x: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Tokens (B, T, D), timestep embedding (B, D), label embedding (B, D) or None."""
        if (y is None) != (self.y_embedder is None):
            raise UsageError("class labels are required for a class-conditional model and refused otherwise")
        tokens = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        return tokens, self.t_embedder(t), None if y is None else self.y_embedder(y)  # type: ignore[misc]  # y_embedder is None only when y is

    def unpatchify(self, x: Tensor) -> Tensor:
        p, c, grid = self.patch_size, self.out_channels, self.input_size // self.patch_size
        x = x.reshape(x.shape[0], grid, grid, p, p, c)  # (B, h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, grid * p, grid * p)  # (B, C, H, W)

    def run_block(self, block: nn.Module, x: Tensor, c: Tensor, use_checkpoint: bool) -> Tensor:
        if use_checkpoint and torch.is_grad_enabled():
            return grad_checkpoint(block, x, c, use_reentrant=False)
        return block(x, c)


class FixedPointMap:
    """z -> Block_fp(fc2(GELU_tanh(fc1([z, u]))), c): one FPDM iteration, restrictable to batch rows."""

    def __init__(self, model: FPDM, u: Tensor, c: Tensor) -> None:
        self.model, self.u, self.c = model, u, c

    def __call__(self, z: Tensor) -> Tensor:
        m = self.model
        h = m.block_fixed_point_projection_fc1(torch.cat([z, self.u], dim=-1))  # (B, T, 2D)
        h = m.block_fixed_point_projection_fc2(F.gelu(h, approximate="tanh"))  # (B, T, D)
        return m.block_fixed_point(h, self.c)  # (B, T, D)

    def restrict(self, rows: Tensor) -> FixedPointMap:
        return FixedPointMap(self.model, self.u[rows], self.c[rows])


class FPDM(_Backbone, FixedPointDenoiser):
    """Pre blocks -> input injection -> one block iterated to a fixed point -> post blocks -> final layer."""

    def __init__(
        self,
        *,
        input_size: int = 32,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 1152,
        num_heads: int = 16,
        pre_depth: int = 1,
        post_depth: int = 1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        mlp_ratio: float = 4.0,
        prepost_timestep: bool = False,
        checkpoint: bool = False,
    ) -> None:
        super().__init__(
            input_size=input_size,
            in_channels=in_channels,
            patch_size=patch_size,
            hidden_size=hidden_size,
            num_heads=num_heads,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            mlp_ratio=mlp_ratio,
        )
        if pre_depth < 0 or post_depth < 0:
            raise UsageError(f"pre_depth and post_depth must be >= 0, got {pre_depth} and {post_depth}")
        self.pre_depth, self.post_depth = pre_depth, post_depth
        self.prepost_timestep, self.checkpoint = prepost_timestep, checkpoint
        d = hidden_size
        self.blocks_pre = nn.ModuleList([self.block() for _ in range(pre_depth)])
        self.block_pre_projection = nn.Linear(d, d)
        self.block_fixed_point_projection_fc1 = nn.Linear(2 * d, 2 * d)
        self.block_fixed_point_projection_fc2 = nn.Linear(2 * d, d)
        self.block_fixed_point = self.block()
        self.blocks_post = nn.ModuleList([self.block() for _ in range(post_depth)])
        self.initialize()

    def block_modules(self) -> list[nn.Module]:
        return [*self.blocks_pre, self.block_fixed_point, *self.blocks_post]

    def prepare(self, x: Tensor, t: Tensor, y: Tensor | None) -> FixedPointProblem:
        """Everything before the solve: the pre-layer output h (B, T, D) as the cold start, the fixed-point map
        with the injection computed once, and the post blocks' condition as the context."""
        tokens, t_emb, y_emb = self.embed(x, t, y)
        c = t_emb if y_emb is None else t_emb + y_emb  # (B, D) the fixed-point block sees timestep + class
        # Officially pre/post/final see the class only; an unconditional model has only the timestep to give.
        c_pp = c if self.prepost_timestep or y_emb is None else y_emb
        h = tokens
        for block in self.blocks_pre:
            h = self.run_block(block, h, c_pp, self.checkpoint)
        return FixedPointProblem(h, FixedPointMap(self, self.block_pre_projection(h), c), c_pp)

    def finish(self, z: Tensor, problem: FixedPointProblem) -> Tensor:
        """Everything after the solve: post blocks and the final layer, (B, T, D) -> (B, C_out, H, W)."""
        c_pp, out = problem.context, z
        for block in self.blocks_post:
            out = self.run_block(block, out, c_pp, self.checkpoint)
        return self.unpatchify(self.final_layer(out, c_pp))

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None,
        *,
        z0: Tensor | None = None,
        iters: int | Tensor,
        solver: Solver | None = None,
        tol: float = 0.0,
        grad_iters: int = 0,
    ) -> DenoiserOutput:
        problem = self.prepare(x, t, y)
        f = problem.f
        z = problem.start if z0 is None else z0  # (B, T, D)
        stats = None
        if (int(iters.max()) if isinstance(iters, Tensor) else iters) > 0:
            if solver is None:
                raise UsageError("iters > 0 needs a solver, e.g. registry.create('solver', 'fixed_point')")
            with torch.no_grad():  # S-JFB's no-grad phase: no activations kept, whatever the caller's mode
                result = solver.solve(f, z.detach(), max_iter=iters, tol=tol)
            if not isinstance(result, SolverResult):  # a plugin's bug, named here rather than deep in the caller
                raise PluginError(
                    f"solver {type(solver).__name__} (module {type(solver).__module__}) returned "
                    f"{type(result).__name__} from solve, not an fpdm SolverResult"
                )
            z, stats = result.z, result.stats
        for _ in range(grad_iters):  # S-JFB's grad phase: unrolled backprop through these iterations only
            z = grad_checkpoint(f, z, use_reentrant=False) if self.checkpoint and torch.is_grad_enabled() else f(z)
        pred = self.finish(z, problem)  # (B, C_out, H, W)
        spent = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device) if stats is None else stats.iterations
        blocks = spent + self.pre_depth + self.post_depth + grad_iters  # (B,)
        return DenoiserOutput(pred, z, stats, blocks)


class DiT(_Backbone):
    """The DiT baseline: a plain stack of `depth` blocks. Ignores the fixed-point arguments; z is None."""

    def __init__(
        self,
        *,
        input_size: int = 32,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 1152,
        num_heads: int = 16,
        depth: int = 28,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        mlp_ratio: float = 4.0,
        checkpoint: bool = False,
    ) -> None:
        super().__init__(
            input_size=input_size,
            in_channels=in_channels,
            patch_size=patch_size,
            hidden_size=hidden_size,
            num_heads=num_heads,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            mlp_ratio=mlp_ratio,
        )
        if depth < 1:
            raise UsageError(f"depth must be >= 1, got {depth}")
        self.depth, self.checkpoint = depth, checkpoint
        self.blocks = nn.ModuleList([self.block() for _ in range(depth)])
        self.initialize()

    def blocks_per_call(self, iters: int) -> int:
        return self.depth

    def block_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None,
        *,
        z0: Tensor | None = None,
        iters: int | Tensor = 0,
        solver: Solver | None = None,
        tol: float = 0.0,
        grad_iters: int = 0,
    ) -> DenoiserOutput:
        h, t_emb, y_emb = self.embed(x, t, y)
        c = t_emb if y_emb is None else t_emb + y_emb  # (B, D)
        for block in self.blocks:
            h = self.run_block(block, h, c, self.checkpoint)
        pred = self.unpatchify(self.final_layer(h, c))  # (B, C_out, H, W)
        blocks = torch.full((x.shape[0],), self.depth, dtype=torch.int64, device=x.device)  # (B,)
        return DenoiserOutput(pred, None, None, blocks)


def parse_arch(arch: str) -> tuple[str, str, int]:
    """'FPDM-XL/2' -> ('fpdm', 'XL', 2). The family is the denoiser's registered name, case-insensitive."""
    family, _, rest = arch.partition("-")
    size, _, patch = rest.partition("/")
    if not family or size not in SIZES or not patch.isdigit():
        raise UsageError(
            f"bad model arch {arch!r}: expected FAMILY-SIZE/PATCH such as FPDM-XL/2 or DiT-S/4; "
            f"sizes {', '.join(SIZES)}"
        )
    return family.lower(), size, int(patch)
