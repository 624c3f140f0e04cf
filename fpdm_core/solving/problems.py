"""Synthetic fixed-point problems with known answers, for solver demos, benchmarks and plugin authors.

Both maps act on the last dimension of a (B, T, n) state and can be restricted to batch rows, like the
denoiser's fixed-point map, so per-sample stopping and compaction are exercised as in a real model.
"""

from __future__ import annotations

import torch
from torch import Tensor


def symmetric_contraction(
    n: int, rate: float, *, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A symmetric (n, n) matrix with eigenvalues spread over [-rate, rate], one of them exactly rate,
    so its spectral norm (the contraction rate) is `rate`."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eig = torch.empty(n, dtype=torch.float64).uniform_(-1.0, 1.0, generator=generator)
    eig[0] = 1.0
    return (rate * (q * eig) @ q.T).to(dtype)


class LinearContraction:
    """z -> z A^T + b, with the closed-form fixed point (I - A)^-1 b. A (n, n) shared, b (B, T, n) per sample."""

    def __init__(self, a: Tensor, b: Tensor) -> None:
        self.a, self.b = a, b

    @classmethod
    def random(
        cls, batch: int, tokens: int, n: int, rate: float, *, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> LinearContraction:
        gen = torch.Generator().manual_seed(seed)
        a = symmetric_contraction(n, rate, generator=gen, dtype=dtype)
        return cls(a, torch.randn(batch, tokens, n, generator=gen, dtype=dtype))

    def __call__(self, z: Tensor) -> Tensor:
        return z @ self.a.T + self.b  # (B, T, n)

    def initial(self) -> Tensor:
        return torch.zeros_like(self.b)

    def restrict(self, rows: Tensor) -> LinearContraction:
        return LinearContraction(self.a, self.b[rows])

    def solution(self) -> Tensor:
        n = self.a.shape[0]
        eye = torch.eye(n, dtype=torch.float64)
        flat = self.b.double().reshape(-1, n).T  # (n, B*T)
        return torch.linalg.solve(eye - self.a.double(), flat).T.reshape(self.b.shape).to(self.b.dtype)


class TanhContraction:
    """z -> tanh(z W^T + x U^T + c) with ||W|| = rate < 1, hence a contraction (tanh is 1-Lipschitz).
    The input injection x (B, T, n) plays the role of the pre-block output in an FPDM."""

    def __init__(self, w: Tensor, u: Tensor, c: Tensor, x: Tensor) -> None:
        self.w, self.u, self.c, self.x = w, u, c, x
        self._inj = x @ u.T + c  # (B, T, n) computed once, like the model's input injection

    @classmethod
    def random(
        cls, batch: int, tokens: int, n: int, rate: float, *, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> TanhContraction:
        gen = torch.Generator().manual_seed(seed)
        w = symmetric_contraction(n, rate, generator=gen, dtype=dtype)
        u = torch.randn(n, n, generator=gen, dtype=dtype) / n**0.5
        c = torch.randn(n, generator=gen, dtype=dtype) * 0.1
        return cls(w, u, c, torch.randn(batch, tokens, n, generator=gen, dtype=dtype))

    def __call__(self, z: Tensor) -> Tensor:
        return torch.tanh(z @ self.w.T + self._inj)  # (B, T, n)

    def initial(self) -> Tensor:
        return torch.zeros_like(self.x)

    def restrict(self, rows: Tensor) -> TanhContraction:
        return TanhContraction(self.w, self.u, self.c, self.x[rows])
