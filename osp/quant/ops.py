"""Dispatch between the Triton kernels and their torch twins.

Default ("auto"): Triton for CUDA tensors when Triton imports, the torch twin otherwise. Force one path with
the `backend=` argument or the environment variable `OSP_QUANT_BACKEND=torch|triton` (the argument wins).
Forcing "triton" on CPU tensors works only under `TRITON_INTERPRET=1` (tests). Shapes a kernel does not
cover (non-power-of-two groups, an odd K, a fused Hadamard on a non-power-of-two row, small GPU groups)
go to the torch twin under "auto" and raise under a forced "triton".
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from . import hadamard as _had
from . import quantizers as _ref

ENV_VAR = "OSP_QUANT_BACKEND"
BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    try:
        from . import kernels
    except ImportError:  # no triton (e.g. macOS): the torch twins cover everything
        return None
    return kernels


def triton_available() -> bool:
    return _kernels() is not None


def resolve_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """'torch' or 'triton' for tensor x, from the argument, then OSP_QUANT_BACKEND, then the device."""
    choice = backend or os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"quant backend {choice!r} is not one of {BACKENDS} (argument or ${ENV_VAR})")
    if choice == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if choice == "triton":
        kernels = _kernels()
        if kernels is None:
            raise RuntimeError("quant backend 'triton' was forced but triton is not importable")
        if not x.is_cuda and not kernels.INTERPRET:
            raise RuntimeError(
                "quant backend 'triton' on a CPU tensor needs TRITON_INTERPRET=1 set before "
                "osp.quant.kernels is imported"
            )
    return choice


def _unsupported(backend: str | None, reason: str) -> str:
    """Fall back to torch under 'auto'; a forced Triton path refuses instead of silently changing numerics."""
    if (backend or os.environ.get(ENV_VAR, "auto")) == "triton":
        raise ValueError(f"Triton kernel cannot handle this input: {reason}")
    return "torch"


def quant_rows(
    x: torch.Tensor,
    bits: int = 4,
    sym: bool = False,
    group_size: int | None = None,
    clip: float = 1.0,
    zero_inclusive: bool = True,
    hadamard: bool = False,
    out: str = "packed",
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token quantization of x (..., K), optionally after a normalized Hadamard over K.

    See `osp.quant.quantizers.quant_rows_torch` for the contract. A Hadamard over a non-power-of-two K is
    applied by `hadamard_transform` first (not fused).
    """
    k = x.shape[-1]
    if hadamard and not _had.is_pow2(k):
        x, hadamard = hadamard_transform(x, backend), False
    path = resolve_backend(x, backend)
    if path == "triton":
        group = group_size or k
        if group != k and (k % group or not _had.is_pow2(group)):
            path = _unsupported(backend, f"group_size={group} is not a power of two dividing K={k}")
        elif out == "packed" and bits == 4 and k % 2:
            path = _unsupported(backend, f"4-bit packing needs an even K, got {k}")
    fn = _kernels().quant_rows_triton if path == "triton" else _ref.quant_rows_torch  # type: ignore[union-attr]
    return fn(x, bits, sym, group_size, clip, zero_inclusive, hadamard, out)


def w4a4_gemm(
    a_packed: torch.Tensor,
    s_a: torch.Tensor,
    z_a: torch.Tensor,
    w_packed: torch.Tensor,
    s_w: torch.Tensor,
    wsum: torch.Tensor,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> torch.Tensor:
    """W4A4 GEMM with the dequant epilogue; see `osp.quant.quantizers.w4a4_gemm_torch`."""
    path = resolve_backend(a_packed, backend)
    if path == "triton" and group_size is not None and (group_size < 64 or not _had.is_pow2(group_size)):
        # Each group is one tile: the int8 dot needs >= 32 packed columns on GPU; the interpreter would
        # accept less, but CI must not pass shapes that cannot compile on the device.
        path = _unsupported(backend, f"activation groups of {group_size} (< 64 or not a power of two)")
    fn = _kernels().w4a4_gemm_triton if path == "triton" else _ref.w4a4_gemm_torch  # type: ignore[union-attr]
    return fn(a_packed, s_a, z_a, w_packed, s_w, wsum, group_size, bias, out_dtype)


def fwht(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Normalized Walsh–Hadamard transform over the last dim (a power of two); result in x's dtype."""
    if resolve_backend(x, backend) == "triton":
        return _kernels().fwht_triton(x)  # type: ignore[union-attr]
    return _had.fwht_torch(x.float()).to(x.dtype)


def hadamard_transform(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """x @ M for the orthonormal Hadamard M of `osp.quant.hadamard`; any supported length, x's dtype."""
    n = x.shape[-1]
    if _had.is_pow2(n):
        return fwht(x, backend)
    b = _had.base_order(n)
    inner = x.float().unflatten(-1, (b, n // b))
    if n > b:
        inner = fwht(inner, backend)
    return _had.apply_base_factor(inner, n).to(x.dtype)
