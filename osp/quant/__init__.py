"""W4A4(KV4) fake-quantized evaluation: reference quantizers, Hadamard rotations, Triton kernels, the
quantized view of a live model, perplexity and GPTQ.

    from osp.quant import QuantConfig, quantized, perplexity
    ppl_fp = perplexity(model, blocks)
    ppl_q = perplexity(model, blocks, quant="w4a4kv4")          # OSP's RTN 4-4-4 row
    with quantized(model, QuantConfig.from_preset("w4a4kv4+had")):
        logits = model(input_ids)                                # the W4A4 view; restored on exit
    ppl_s = perplexity(model, blocks, quant="w8a8+static", calib_blocks=calib)   # static per-tensor INT8
    attribute(model, blocks, "w4a4kv4")                          # the cost of each site alone
                                                                 # (attribution.py)
"""

from .attribution import attribute
from .config import OFF, PRESETS, QuantConfig, QuantConfigError
from .evaluation import eval_config, evaluate_quant
from .hadamard import hadamard_matrix
from .layers import KVQuantizer, QuantLinear
from .ops import fwht, hadamard_transform, quant_rows, w4a4_gemm
from .quantizers import (
    QuantizedWeight,
    fake_quant,
    pack_int4,
    quantize_weight,
    static_fake_quant,
    unpack_int4,
    weight_scale,
)
from .w4a4 import nll_stats, perplexity, quantized, site_names

__all__ = [
    "OFF",
    "PRESETS",
    "KVQuantizer",
    "QuantConfig",
    "QuantConfigError",
    "QuantLinear",
    "QuantizedWeight",
    "attribute",
    "eval_config",
    "evaluate_quant",
    "fake_quant",
    "fwht",
    "hadamard_matrix",
    "hadamard_transform",
    "nll_stats",
    "pack_int4",
    "perplexity",
    "quant_rows",
    "w4a4_gemm",
    "quantize_weight",
    "quantized",
    "site_names",
    "static_fake_quant",
    "unpack_int4",
    "weight_scale",
]
