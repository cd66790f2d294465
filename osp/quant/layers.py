"""The modules the W4A4 view swaps into a live model: QuantLinear (one linear layer) and KVQuantizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .hadamard import is_pow2
from .quantizers import QuantizedWeight, static_fake_quant


@dataclass(frozen=True)
class ActQuant:
    """Quantizer of one linear input: dynamic per token (or group), or static with one calibrated
    symmetric scale for the whole tensor (`static_scale`)."""

    bits: int
    sym: bool
    group_size: int | None
    clip: float
    static_scale: float | None = None

    @property
    def zero_inclusive(self) -> bool:
        # OSP's per-token path widens the range to contain 0; its group path does not.
        return self.group_size is None


class QuantLinear(nn.Module):
    """Stands in for one nn.Linear while the W4A4 view is open; the original is kept as `.inner`.

    `weight` is the dense effective weight the torch path multiplies with: the dequantized codes (W4,
    materialized on first use), or the fp weight (W16). With `smooth` (osp.quant.smooth) the input is x / s
    and the weight W diag(s); with `hadamard`, input and weight are then both in the rotated basis (x M, W M).
    On CUDA (Triton backend) a 4-bit weight with a 4-bit input runs the integer W4A4 GEMM on packed codes
    instead, and no dense copy is made.
    """

    def __init__(
        self,
        inner: nn.Linear,
        weight: torch.Tensor | None,
        act: ActQuant | None,
        hadamard: bool,
        backend: str | None,
        smooth: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.smooth = smooth
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.qweight: QuantizedWeight | None = None
        self.act = act
        self.hadamard = hadamard
        self.backend = backend
        self.quantize_input = act is not None
        # GPTQ calibration: called with the (rotated) input while quantize_input is off.
        self.observer: Callable[[torch.Tensor], None] | None = None
        self._dense = weight
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def weight(self) -> torch.Tensor:
        if self._dense is None:
            assert self.qweight is not None, "QuantLinear needs a weight or quantized codes"
            self._dense = self.qweight.dequantize(self.inner.weight.dtype)
        return self._dense

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner.bias

    def set_qweight(self, qweight: QuantizedWeight) -> None:
        self.qweight = qweight
        self._dense = None
        self._packed = None

    def _int_gemm_ok(self, x: torch.Tensor) -> bool:
        act, qw = self.act, self.qweight
        if act is None or qw is None or act.bits != 4 or qw.bits != 4 or self.in_features % 2:
            return False
        # the integer GEMM takes per-token scales; static runs the torch path
        if act.static_scale is not None:
            return False
        if ops.resolve_backend(x, self.backend) != "triton":
            return False
        group = act.group_size
        return group is None or (group >= 64 and is_pow2(group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = (x.float() / self.smooth).to(x.dtype)
        if not self.quantize_input:
            x = ops.hadamard_transform(x, self.backend) if self.hadamard else x
            if self.observer is not None:
                self.observer(x)
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        act = self.act
        assert act is not None
        if self._int_gemm_ok(x):
            return self._int_gemm(x)
        if act.static_scale is not None:
            x = static_fake_quant(ops.hadamard_transform(x, self.backend) if self.hadamard else x,
                                  act.static_scale, act.bits)
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        x = ops.quant_rows(
            x,
            act.bits,
            act.sym,
            act.group_size,
            act.clip,
            act.zero_inclusive,
            self.hadamard,
            "fake",
            self.backend,
        )
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def _int_gemm(self, x: torch.Tensor) -> torch.Tensor:
        act, qw = self.act, self.qweight
        assert act is not None and qw is not None
        if self._packed is None:
            self._packed = (qw.packed(), qw.group_sums(act.group_size))
        w_packed, wsum = self._packed
        x2 = x.reshape(-1, self.in_features)
        codes, scale, zero = ops.quant_rows(
            x2,
            4,
            act.sym,
            act.group_size,
            act.clip,
            act.zero_inclusive,
            self.hadamard,
            "packed",
            self.backend,
        )
        y = ops.w4a4_gemm(
            codes, scale, zero, w_packed, qw.scale, wsum, act.group_size, self.bias, x.dtype, self.backend
        )
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        w = f"w{self.qweight.bits}" if self.qweight is not None else "w16"
        a = (
            f"a{self.act.bits}" + (f"g{self.act.group_size}" if self.act.group_size else "")
            if self.act
            else "a16"
        )
        return (f"{self.in_features} -> {self.out_features}, {w}{a}"
                + (", smoothed" if self.smooth is not None else "") + (", hadamard" if self.hadamard else ""))


class KVQuantizer:
    """(k, v) -> (k, v) on (B, n_kv_heads, T, head_dim), after RoPE: per token and head, asymmetric.

    K: normalized Hadamard over head_dim, quantize with a 0-inclusive range, rotate back. OSP rotates Q and
    K and attends in the rotated basis; since (qH)(kH)^T = q k^T and H = H^T = H^-1, rotating the quantized
    K back is the same product. V: OSP's group path (range not forced to contain 0).
    """

    def __init__(self, bits: int, sym: bool, clip: float, k_hadamard: bool, backend: str | None) -> None:
        self.bits, self.sym, self.clip, self.k_hadamard, self.backend = bits, sym, clip, k_hadamard, backend

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kq = ops.quant_rows(
            k, self.bits, self.sym, None, self.clip, True, self.k_hadamard, "fake", self.backend
        )
        if self.k_hadamard:
            kq = ops.fwht(kq, self.backend)
        vq = ops.quant_rows(v, self.bits, self.sym, None, self.clip, False, False, "fake", self.backend)
        return kq, vq  # type: ignore[return-value]
