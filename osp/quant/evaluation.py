"""One-shot quantized evaluation of a trained model (what `osp eval MODEL --quant ...` reports)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from osp.errors import QuantConfigError

from .config import QuantConfig
from .w4a4 import nll_stats, quantized


def eval_config(preset: str = "w4a4kv4", hadamard: bool = False, gptq: bool = False) -> QuantConfig:
    """The QuantConfig of `osp eval --quant PRESET [--hadamard] [--gptq]`."""
    overrides: dict[str, Any] = {}
    if hadamard:
        overrides["down_hadamard"] = True
    if gptq:
        overrides["w_method"] = "gptq"
    return QuantConfig.from_preset(preset, **overrides)


def evaluate_quant(
    model: nn.Module,
    blocks: torch.Tensor,
    quant: QuantConfig | str = "w4a4kv4",
    calib_blocks: torch.Tensor | None = None,
    batch_size: int = 8,
    backend: str | None = None,
) -> dict[str, Any]:
    """Perplexity of the model in full precision and under `quant` (a QuantConfig, e.g. from `eval_config`, or
    a preset) on held-out blocks (N, T+1).

    GPTQ weights and `+static` activation scales are computed on `calib_blocks` (training-distribution text,
    never the evaluation blocks). Returns {"preset", "config", "ppl_fp", "ppl_quant", "ratio", "nll_fp",
    "nll_quant", "tokens", "seconds_fp", "seconds_quant"}; "preset" is the canonical name, e.g.
    "w4a4kv4+had+gptq".
    """
    cfg = QuantConfig.resolve(quant)
    if cfg.needs_calibration and calib_blocks is None:
        raise QuantConfigError(f"{cfg.name} needs calibration blocks from the training distribution "
                               "(calib_blocks)")

    start = time.perf_counter()
    nll_fp, tokens = nll_stats(model, blocks, batch_size)
    seconds_fp = time.perf_counter() - start
    start = time.perf_counter()
    with quantized(model, cfg, calib_blocks=calib_blocks, calib_batch_size=batch_size, backend=backend):
        nll_q, _ = nll_stats(model, blocks, batch_size)
    seconds_quant = time.perf_counter() - start

    ppl_fp, ppl_q = math.exp(nll_fp / tokens), math.exp(nll_q / tokens)
    return {
        "preset": cfg.name,
        "config": cfg.to_dict(),
        "ppl_fp": ppl_fp,
        "ppl_quant": ppl_q,
        "ratio": ppl_q / ppl_fp,
        "nll_fp": nll_fp / tokens,
        "nll_quant": nll_q / tokens,
        "tokens": tokens,
        "seconds_fp": seconds_fp,
        "seconds_quant": seconds_quant,
    }
