"""GPTQ (Frantar et al., 2022) for the W4A4 view: second-order weight rounding with calibration data.

Follows OSP/SpinQuant's `gptq_fwrd`: blocks are processed in order; inside a block the linears are
quantized in sequential groups of those that read the same input ({q,k,v}, {o}, {gate,up}, {down} for a
Llama block; found by running the block, so gated blocks work too); each group's Hessian is collected with
the earlier groups already quantized and with full-precision activations; the per-channel scale (with the
MSE clip sweep) is fixed once from the full weight; 1% damping of mean diag(H); optional act-order.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from torch import nn

from osp.errors import QuantConfigError

from ..model.eval_context import eval_mode
from .config import QuantConfig
from .layers import QuantLinear
from .quantizers import QuantizedWeight, qrange, quantize_weight, weight_scale


def _in_fp32(fn):
    """Run fn with autocast off: GPTQ's Hessian and error propagation are fp32 math, and under a bf16 autocast
    (evaluation in a run's own precision) X^T X in bf16 is not even positive semi-definite."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


@_in_fp32
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    bits: int = 4,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> QuantizedWeight:
    """Quantize weight[out, in] column by column, pushing each column's rounding error onto the columns not
    yet quantized through the inverse Hessian (in x in). Symmetric codes with the given per-row scale."""
    w = weight.float().clone()
    h = hessian.float().clone()
    lo, hi = qrange(bits)
    s = scale.reshape(-1).float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], device=h.device)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise QuantConfigError(
            f"GPTQ: the damped Hessian of a layer with {h.shape[0]} inputs is not positive definite at "
            f"quant.gptq_percdamp={percdamp}; raise it (e.g. quant.gptq_percdamp=0.1)"
        ) from err
    codes = torch.zeros_like(w)
    n_cols = w.shape[1]
    for i1 in range(0, n_cols, blocksize):
        i2 = min(i1 + blocksize, n_cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = torch.clamp(torch.round(col / s), lo, hi)
            codes[:, i1 + i] = q
            err = (col - s * q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(codes.to(torch.int8), s.reshape(-1, 1), bits)


class _Hessian:
    """Running X^T X / n of a linear's inputs (fp32)."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.rows = 0

    @_in_fp32
    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        xtx = x2.T @ x2
        self.sum = xtx if self.sum is None else self.sum + xtx
        self.rows += x2.shape[0]

    def matrix(self) -> torch.Tensor:
        assert self.sum is not None
        return self.sum / max(self.rows, 1)


class _Captured(Exception):
    """Raised by the hook on the first block to stop the forward once its inputs are caught."""


Inputs = list[tuple[torch.Tensor, tuple, dict]]


def _first_block_inputs(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> Inputs:
    captured: Inputs = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args[0], args[1:], kwargs))
        raise _Captured

    device = next(model.parameters()).device
    handle = model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in blocks.split(batch_size):
            try:
                model(batch[:, :-1].to(device))
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    outs = []
    for h, args, kwargs in inputs:
        out = block(h, *args, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _sequential_groups(
    block: nn.Module, linears: list[QuantLinear], sample: Inputs
) -> list[list[QuantLinear]]:
    """Linears grouped by the tensor they read, in call order. Inputs stay referenced during the pass, so
    object identity cannot be confused by a freed tensor's reused memory."""
    seen: OrderedDict[int, list[QuantLinear]] = OrderedDict()
    keep: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple) -> None:
        keep.append(args[0])
        group = seen.setdefault(id(args[0]), [])
        if module not in group:
            group.append(module)  # type: ignore[arg-type]

    handles = [m.register_forward_pre_hook(record) for m in linears]
    try:
        _run_block(block, sample)
    finally:
        for handle in handles:
            handle.remove()
    groups, placed = [], set()
    for group in seen.values():
        fresh = [m for m in group if id(m) not in placed]
        placed.update(id(m) for m in fresh)
        if fresh:
            groups.append(fresh)
    return groups


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    weights: dict[QuantLinear, torch.Tensor],
    calib_blocks: torch.Tensor,
    cfg: QuantConfig,
    batch_size: int = 8,
) -> None:
    """Give every QuantLinear of the view GPTQ weights; `weights` maps each to its effective fp32 weight.

    The wrappers must have input quantization off and no KV quantizer installed (GPTQ sees fp activations).
    A linear that the calibration forward never reaches gets RTN weights.
    """
    with eval_mode(model):
        inputs = _first_block_inputs(model, calib_blocks, batch_size)
        for block in model.layers:
            linears = [m for m in block.modules() if isinstance(m, QuantLinear) and m in weights]
            for group in _sequential_groups(block, linears, inputs[:1]):
                hessians = {m: _Hessian() for m in group}
                for m in group:
                    m.observer = hessians[m].add
                try:
                    _run_block(block, inputs)
                finally:
                    for m in group:
                        m.observer = None
                for m in group:
                    w = weights[m]
                    scale = weight_scale(
                        w, cfg.w_bits, cfg.w_mse, cfg.w_mse_grid, cfg.w_mse_maxshrink, cfg.w_mse_norm
                    )
                    m.set_qweight(
                        gptq_quantize(
                            w, hessians[m].matrix(), scale, cfg.w_bits, cfg.gptq_blocksize, cfg.gptq_percdamp,
                            cfg.gptq_act_order,
                        )
                    )  # fmt: skip
            for m in linears:
                if m.qweight is None:
                    w = weights[m]
                    m.set_qweight(
                        quantize_weight(
                            w, cfg.w_bits, cfg.w_mse, cfg.w_mse_grid, cfg.w_mse_maxshrink, cfg.w_mse_norm
                        )
                    )
            outs = _run_block(block, inputs)
            inputs = [(out, args, kwargs) for out, (_, args, kwargs) in zip(outs, inputs)]
