"""Fixed-point maps with independently known answers, written here rather than taken from fpdm.problems so
the tests do not grade the project with its own oracle."""

from __future__ import annotations

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

    def restrict(self, rows: Tensor) -> "Linear":
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

    def restrict(self, rows: Tensor) -> "Tanh":
        return Tanh(self.w, self.inj[rows])

    def reference(self, iters: int = 4000) -> Tensor:
        z = torch.zeros_like(self.inj)
        for _ in range(iters):
            z_next = self(z)
            if torch.equal(z_next, z):
                break
            z = z_next
        return z


class Plain:
    """Hides `restrict`, so the solver must evaluate the whole batch."""

    def __init__(self, f) -> None:  # type: ignore[no-untyped-def]
        self.f = f

    def __call__(self, z: Tensor) -> Tensor:
        return self.f(z)


def linear(batch: int, tokens: int, n: int, rate: float, seed: int, *, symmetric: bool = False, dtype=torch.float64) -> Linear:
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
    gen = torch.Generator().manual_seed(seed)
    w = scaled_to_norm(torch.randn(n, n, generator=gen, dtype=torch.float64), rate)
    return Tanh(w, torch.randn(batch, tokens, n, generator=gen, dtype=torch.float64))
