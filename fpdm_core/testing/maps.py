"""Fixed-point maps with independently known answers, the solver suite's oracles.

Written here rather than taken from `fpdm.solving.problems` so the suite does not grade the solvers with the
project's own benchmark maps. Everything is float64 unless asked otherwise and seeded: the same arguments give
the same map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def scaled_to_norm(m: Tensor, rate: float) -> Tensor:
    """m rescaled so its spectral norm is exactly `rate`."""
    norm = torch.linalg.matrix_norm(m, ord=2)
    return m * (rate / norm) if norm > 0 else m


class Linear:
    """z -> z A^T + b on the last dim. A (n, n), b (B, T, n). Restrictable to batch rows."""

    def __init__(self, a: Tensor, b: Tensor) -> None:
        self.a, self.b = a, b
        self.calls = 0

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        return z @ self.a.T + self.b

    def restrict(self, rows: Tensor) -> Linear:
        return Linear(self.a, self.b[rows])

    def exact(self) -> Tensor:
        n = self.a.shape[0]
        rhs = self.b.reshape(-1, n).T  # (n, B*T)
        return torch.linalg.solve(torch.eye(n, dtype=self.a.dtype) - self.a, rhs).T.reshape(self.b.shape)


class Tanh:
    """z -> tanh(z W^T + inj), ||W|| < 1 so it contracts with rate ||W||. Restrictable."""

    def __init__(self, w: Tensor, inj: Tensor) -> None:
        self.w, self.inj = w, inj

    def __call__(self, z: Tensor) -> Tensor:
        return torch.tanh(z @ self.w.T + self.inj)

    def restrict(self, rows: Tensor) -> Tanh:
        return Tanh(self.w, self.inj[rows])

    def reference(self, iters: int = 4000) -> Tensor:
        z = torch.zeros_like(self.inj)
        for _ in range(iters):
            z_next = self(z)
            if torch.equal(z_next, z):
                break
            z = z_next
        return z


class Rowwise:
    """A batch whose rows are separate problems (a mixed batch of easy and hard ones). Restrictable."""

    def __init__(self, rows: list[Callable[[Tensor], Tensor]], index: list[int] | None = None) -> None:
        self.rows = rows
        self.index = list(range(len(rows))) if index is None else index

    def __call__(self, z: Tensor) -> Tensor:
        return torch.cat([self.rows[i](z[j : j + 1]) for j, i in enumerate(self.index)])

    def restrict(self, rows: Tensor) -> Rowwise:
        return Rowwise(self.rows, [self.index[r] for r in rows.tolist()])


class Plain:
    """Hides `restrict`, so the solver must evaluate the whole batch."""

    def __init__(self, f: Callable[[Tensor], Tensor]) -> None:
        self.f = f

    def __call__(self, z: Tensor) -> Tensor:
        return self.f(z)


def linear(
    batch: int,
    tokens: int,
    n: int,
    rate: float,
    seed: int,
    *,
    symmetric: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Linear:
    """A random affine contraction with spectral norm `rate` (symmetric: spectral radius `rate` too, so plain
    iteration needs about log(tol) / log(rate) steps). b (batch, tokens, n)."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    if symmetric:
        q, _ = torch.linalg.qr(m)
        eig = torch.empty(n, dtype=torch.float64).uniform_(-1, 1, generator=gen)
        eig[0] = 1.0
        m = (q * eig) @ q.T
    a = scaled_to_norm(m, rate).to(dtype)
    return Linear(a, torch.randn(batch, tokens, n, generator=gen, dtype=torch.float64).to(dtype))


def tanh(batch: int, tokens: int, n: int, rate: float, seed: int) -> Tanh:
    """A random tanh contraction with Lipschitz constant <= `rate`. inj (batch, tokens, n)."""
    gen = torch.Generator().manual_seed(seed)
    w = scaled_to_norm(torch.randn(n, n, generator=gen, dtype=torch.float64), rate)
    return Tanh(w, torch.randn(batch, tokens, n, generator=gen, dtype=torch.float64))
