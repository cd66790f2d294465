"""Independent check of the W4A4 view: a transformers LlamaForCausalLM with the same weights, fake-quantized
in a plain loop with the reference quantizers (weights rewritten, hooks on its Linear inputs and V output,
a custom attention function that rotates Q and K and quantizes K, as OSP's QKRotationWrapper), must give
the same perplexity as `perplexity(model, blocks, quant=...)`.

Both models run in float64 (the quantizers in fp32, as specified), attention through SDPA on both sides.
Tolerance: relative 1e-9 on perplexity (observed: equal to all printed digits; the slack covers float64
summation order). A single flipped 4-bit code moves perplexity by far more.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from osp.quant import QuantConfig, perplexity
from osp.quant import quantizers as Q
from osp.quant.hadamard import fwht_torch
from tests.support.models import make_model

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

HEAD_DIM = 64


def osp_style_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """OSP's K path: normalized Hadamard on Q and K (fp32), K quantized per token and head, 0-inclusive."""
    query = fwht_torch(query.float()).to(query.dtype)
    key = Q.fake_quant(fwht_torch(key.float()), 4).to(key.dtype)
    # HF builds masks for a custom attention function as for SDPA (None = causal), so attend through SDPA.
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


AttentionInterface.register("osp_w4a4_check", osp_style_attention)


def to_hf(model) -> LlamaForCausalLM:
    cfg = model.cfg
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False,
    )
    hf = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float64)
    state = {(k if k.startswith("lm_head") else f"model.{k}"): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)  # osp uses HF Llama names: a plain copy
    return hf.eval()


def fake_quantize_hf(hf: LlamaForCausalLM, cfg: QuantConfig) -> list:
    """Quantize hf in place, layer by layer, with the reference quantizers; returns the hook handles."""
    handles = []
    for layer in hf.model.layers:
        for name, lin in layer.named_modules():
            if not isinstance(lin, torch.nn.Linear):
                continue
            rotate = cfg.down_hadamard and name.endswith("down_proj")
            with torch.no_grad():
                w = lin.weight.double()
                if cfg.w_bits < 16:
                    w = w.bfloat16().double()
                    w = fwht_torch(w) if rotate else w
                    w = Q.quantize_weight(w.float(), cfg.w_bits).dequantize().double()
                elif rotate:
                    w = fwht_torch(w)
                lin.weight.copy_(w)
            if cfg.a_bits < 16:
                if name.endswith("o_proj"):
                    def quant(x):
                        return Q.fake_quant(x, 4, group_size=HEAD_DIM, zero_inclusive=False)
                elif rotate:
                    def quant(x):
                        return Q.fake_quant(fwht_torch(x.float()), 4).to(x.dtype)
                else:
                    def quant(x):
                        return Q.fake_quant(x, 4)
                handles.append(lin.register_forward_pre_hook(lambda m, args, q=quant: (q(args[0]),)))
            elif rotate:
                handles.append(
                    lin.register_forward_pre_hook(
                        lambda m, args: (fwht_torch(args[0].float()).to(args[0].dtype),)
                    )
                )
        if cfg.kv_bits < 16:
            def v_quant(m, args, out):
                return Q.fake_quant(out, 4, group_size=HEAD_DIM, zero_inclusive=False)

            handles.append(layer.self_attn.v_proj.register_forward_hook(v_quant))
    if cfg.kv_bits < 16:
        hf.set_attn_implementation("osp_w4a4_check")
    return handles


def hf_perplexity(hf: LlamaForCausalLM, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        logits = hf(blocks[:, :-1]).logits
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), blocks[:, 1:].reshape(-1))
    return math.exp(nll.item())


@pytest.fixture(scope="module")
def pair():
    model = make_model(n_kv_heads=1, init_std=0.08).double()
    blocks = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(3))
    return model, blocks


def test_same_full_precision_perplexity(pair):
    model, blocks = pair
    assert perplexity(model, blocks) == pytest.approx(hf_perplexity(to_hf(model), blocks), rel=1e-9)


@pytest.mark.parametrize("preset", ["w4a4kv4", "w4a4kv4+had", "w4a16", "w16a4", "w16a4kv4"])
def test_same_quantized_perplexity(pair, preset):
    model, blocks = pair
    cfg = QuantConfig.from_preset(preset)
    hf = to_hf(model)
    fake_quantize_hf(hf, cfg)
    ppl_hf = hf_perplexity(hf, blocks)
    ppl_view = perplexity(model, blocks, quant=cfg)
    ppl_fp = perplexity(model, blocks)
    assert ppl_view != pytest.approx(ppl_fp, rel=1e-4)  # the quantization is visible ...
    assert ppl_view == pytest.approx(ppl_hf, rel=1e-9)  # ... and identical in both implementations
