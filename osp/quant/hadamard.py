"""Hadamard transforms: the fast Walsh–Hadamard transform (torch twin of the Triton kernel) and
orthonormal Hadamard rotations of any size n = b * 2^m for which a Hadamard matrix of order b is built here.

Construction of the order-b factor: Sylvester (b = 1), Paley I (b = q + 1, q prime, q = 3 mod 4) or
Paley II (b = 2 (q + 1), q prime, q = 1 mod 4); the smallest admissible b dividing n is used, and the rest
of n is a power of two handled by the FWHT. This covers QuaRot's factors 12, 20, 28, 36, 40, 60, 108, 140
exactly and, e.g., 5504 = 43 * 128 through Paley I with q = 5503. Any normalized Hadamard matrix is an
equally valid "online Hadamard" (OSP picks a fixed table per size), so perplexities with a non-power-of-two
rotation can differ slightly from OSP's for the same model.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import torch


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fwht_torch(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh–Hadamard transform over the last dim (a power of two): x @ H_n / sqrt(n).

    H_n is Sylvester's (symmetric, so the transform is its own inverse). Radix-2 butterflies in the same
    order as the Triton kernel, then one multiply by fp32(1/sqrt(n)): both give identical fp32 results.
    """
    n = x.shape[-1]
    if not is_pow2(n):
        raise ValueError(f"fwht needs a power-of-two length, got {n}; use hadamard_transform")
    h = 1
    while h < n:
        a, b = x.unflatten(-1, (n // (2 * h), 2, h)).unbind(-2)
        x = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return x * (1.0 / math.sqrt(n))


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = Legendre symbol of (j - i) mod q, for prime q."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    chi[torch.tensor(sorted({(i * i) % q for i in range(1, q)}), dtype=torch.long)] = 1.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(b: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order b by Paley I or II (prime q only), or None."""
    q = b - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(b, b, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(b, dtype=torch.float64) + s  # H = I + S with S skew, S S^T = q I
    if b % 2 == 0:
        q = b // 2 - 1
        if _is_prime(q) and q % 4 == 1:
            c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)  # symmetric conference matrix
            plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), minus)
    return None


@cache
def _base_factor(n: int) -> tuple[int, torch.Tensor | None]:
    """(b, H_b) with n = b * 2^m and H_b a ±1 Hadamard matrix as int8 (None when b = 1)."""
    twos = (n & -n).bit_length() - 1
    odd = n >> twos
    if odd == 1:
        return 1, None
    for i in range(2, twos + 1):
        matrix = _paley(odd << i)
        if matrix is not None:
            return odd << i, matrix.to(torch.int8)  # cached: 8x smaller than float64
    raise ValueError(
        f"no Hadamard matrix of order {n} is built here (n = b * 2^m needs a Paley order b = q+1 or 2(q+1) "
        f"with q prime); choose a power-of-two size, or one of 12, 20, 28, 36, 40, 60, 108, 140 times 2^m"
    )


def has_hadamard(n: int) -> bool:
    """Whether `hadamard_transform` supports length n."""
    try:
        _base_factor(n)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=8)
def _base_matrix(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    b, matrix = _base_factor(n)
    assert matrix is not None
    return (matrix.double() / math.sqrt(b)).to(device=device, dtype=dtype)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal matrix M (n x n) that `hadamard_transform` applies: x -> x @ M."""
    b, base = _base_factor(n)
    inner = fwht_torch(torch.eye(n // b, dtype=torch.float64))  # normalized Sylvester matrix
    return (inner if base is None else torch.kron(base.double() / math.sqrt(b), inner)).to(dtype)


def base_order(n: int) -> int:
    """b in n = b * 2^m: the order of the non-Sylvester Hadamard factor (1 for a power of two)."""
    return _base_factor(n)[0]


def apply_base_factor(inner: torch.Tensor, n: int) -> torch.Tensor:
    """Second step of `hadamard_transform`: inner is the FWHT of the (..., b, n/b) view of the rows."""
    base = _base_matrix(n, inner.device, inner.dtype)
    # (A ⊗ B) acting on row vectors: X -> A^T X B for X the (b, n/b) view of the row.
    return torch.einsum("...jk,ji->...ik", inner, base).flatten(-2)


def hadamard_transform_torch(x: torch.Tensor) -> torch.Tensor:
    """x @ M over the last dim, M = (H_b / sqrt(b)) ⊗ (H_2^m / sqrt(2^m)) orthonormal; in x's dtype.

    Rotating a linear layer's input this way and its weight the same way (W -> W @ M, i.e. this function on
    W's rows) leaves x W^T unchanged, because M M^T = I.
    """
    n = x.shape[-1]
    if is_pow2(n):
        return fwht_torch(x)
    b = base_order(n)
    return apply_base_factor(fwht_torch(x.unflatten(-1, (b, n // b))), n)
