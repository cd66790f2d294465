"""The W4A4 view: bit-exact restore, coverage, numerics of one layer and of K/V, perplexity, backends."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from osp.model import ModelConfig, Transformer
from osp.quant import QuantConfig, QuantLinear, nll_stats, perplexity, quantized
from osp.quant import quantizers as Q
from osp.quant.hadamard import fwht_torch
from osp.quant.layers import KVQuantizer
from tests.support.models import make_model


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: (p, p.detach().clone()) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modules": dict(model.named_modules()),
        "training": {n: m.training for n, m in model.named_modules()},
        "kv": {n: m.kv_quantizer for n, m in model.named_modules() if hasattr(m, "kv_quantizer")},
    }


def assert_restored(model: nn.Module, snap: dict) -> None:
    params = dict(model.named_parameters())
    assert params.keys() == snap["params"].keys()
    for name, (obj, value) in snap["params"].items():
        assert params[name] is obj and torch.equal(obj, value) and obj.dtype == value.dtype, name
    for name, value in model.named_buffers():
        assert torch.equal(value, snap["buffers"][name]), name
    modules = dict(model.named_modules())
    assert modules.keys() == snap["modules"].keys()
    assert all(modules[n] is m for n, m in snap["modules"].items())
    assert {n: m.training for n, m in model.named_modules()} == snap["training"]
    assert {n: m.kv_quantizer for n, m in model.named_modules() if hasattr(m, "kv_quantizer")} == snap["kv"]


@pytest.mark.parametrize("preset", ["w4a4kv4", "w4a4kv4+had"])
def test_view_restores_the_model_bit_for_bit(tiny_model, blocks, preset):
    tiny_model.train()
    tiny_model.layers[1].mlp.eval()  # a mixed train/eval state must come back as it was
    snap = snapshot(tiny_model)
    ids = blocks[:2, :-1]
    before = tiny_model(ids)
    with quantized(tiny_model, preset):
        during = tiny_model(ids)
        assert isinstance(tiny_model.layers[0].self_attn.q_proj, QuantLinear)
    assert not torch.equal(before, during)
    assert_restored(tiny_model, snap)
    assert torch.equal(tiny_model(ids), before)


def test_view_restores_on_exception(tiny_model, blocks):
    snap = snapshot(tiny_model)
    with pytest.raises(RuntimeError, match="boom"), quantized(tiny_model, "w4a4kv4"):
        tiny_model(blocks[:1, :-1])
        raise RuntimeError("boom")
    assert_restored(tiny_model, snap)


def test_failed_entry_leaves_the_model_untouched(tiny_model):
    snap = snapshot(tiny_model)
    with (
        pytest.raises(ValueError, match="multiple of the activation group"),
        quantized(tiny_model, QuantConfig(a_group_size=48)),
    ):
        pass
    with pytest.raises(ValueError, match="calib"), quantized(tiny_model, "w4a4kv4+gptq"):
        pass
    assert_restored(tiny_model, snap)


def test_nested_views_are_refused(tiny_model):
    with (
        quantized(tiny_model, "w4a4kv4"),
        pytest.raises(RuntimeError, match="already inside"),
        quantized(tiny_model, "w4a16"),
    ):
        pass


def test_full_precision_view_is_the_model(tiny_model, blocks):
    ids = blocks[:2, :-1]
    with quantized(tiny_model, "fp"):
        assert torch.equal(tiny_model(ids), tiny_model.__class__.forward(tiny_model, ids))
    ref = tiny_model(ids)
    with quantized(tiny_model, "w16a16"):
        assert torch.equal(tiny_model(ids), ref)


def test_every_block_linear_is_wrapped_and_the_rest_is_not():
    model = make_model(emb_proj=True, n_kv_heads=1)
    outside = {n: m for n, m in model.named_modules() if not n.startswith("layers")}
    with quantized(model, "w4a4kv4"):
        for block in model.layers:
            wrapped = {n for n, m in block.named_modules() if isinstance(m, QuantLinear)}
            assert wrapped == {f"self_attn.{p}_proj" for p in "qkvo"} | {
                f"mlp.{p}_proj" for p in ("gate", "up", "down")
            }
            assert block.self_attn.o_proj.act.group_size == model.cfg.head_dim
            assert block.self_attn.q_proj.act.group_size is None
            assert isinstance(block.self_attn.kv_quantizer, KVQuantizer)
        # embedding, EmbProj maps, final norm and head: the very same full-precision modules
        assert {n: m for n, m in model.named_modules() if not n.startswith("layers")} == outside


@pytest.mark.parametrize("gate", ["headwise", "elementwise", "head_slice"])
def test_gated_blocks_quantize_every_linear_input(gate):
    # Documented choice: attention gates and GatedNorm's down/up maps are linears inside the blocks, so
    # their weights and inputs are quantized like q/k/v (W4A4 = every linear input of a block).
    model = make_model(attn_gate=gate, gated_norm_rank=4)
    linears = {n for n, m in model.layers.named_modules() if isinstance(m, nn.Linear)}
    with quantized(model, "w4a4kv4"):
        wrapped = {n for n, m in model.layers.named_modules() if isinstance(m, QuantLinear)}
        assert wrapped == linears
        assert torch.isfinite(model(torch.randint(0, 128, (1, 8)))).all()


def test_quant_linear_is_fake_quant_input_times_rtn_weight(tiny_model):
    x = torch.randn(3, 5, 128)
    lin = tiny_model.layers[0].mlp.up_proj
    w_hat = Q.quantize_weight(lin.weight.detach().bfloat16().float(), 4).dequantize()
    want = F.linear(Q.fake_quant(x, 4), w_hat)
    with quantized(tiny_model, "w4a4kv4"):
        got = tiny_model.layers[0].mlp.up_proj(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_down_projection_hadamard_is_function_preserving_without_quantization(tiny_model, blocks):
    ids = blocks[:2, :-1]
    ref = tiny_model(ids)
    with quantized(tiny_model, QuantConfig.from_preset("fp", down_hadamard=True)):
        assert tiny_model.layers[0].mlp.down_proj.hadamard
        torch.testing.assert_close(tiny_model(ids), ref, rtol=1e-4, atol=1e-5)


def test_kv_quantizer_matches_osp_rotated_q_and_k():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 64) for _ in range(3))
    k2, v2 = KVQuantizer(4, False, 1.0, True, None)(k, v)
    # OSP: scores = (q H)(Q(k H))^T, Q per (token, head) with a 0-inclusive range; V: group path.
    # Same codes on both sides; only the fp32 order of the products differs.
    osp_scores = fwht_torch(q) @ Q.fake_quant(fwht_torch(k), 4).transpose(-1, -2)
    torch.testing.assert_close(q @ k2.transpose(-1, -2), osp_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v2, Q.fake_quant(v, 4, zero_inclusive=False))


def test_fewer_bits_move_logits_further(tiny_model, blocks):
    ids = blocks[:2, :-1]
    ref = tiny_model(ids)
    errs = []
    for preset in ("w8a8kv8", "w4a4kv4", "w3a3kv3"):
        with quantized(tiny_model, preset):
            errs.append((tiny_model(ids) - ref).norm().item())
    assert errs[0] < errs[1] < errs[2]


def test_perplexity_is_token_weighted_exp_mean_nll(tiny_model, blocks):
    logits = tiny_model.eval()(blocks[:, :-1])
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert perplexity(tiny_model, blocks, batch_size=4) == pytest.approx(math.exp(nll.item()), rel=1e-5)
    total, count = nll_stats(tiny_model, blocks, batch_size=4, num_valid=5)
    assert count == 5 * 32
    assert total / count == pytest.approx(
        F.cross_entropy(logits[:5].reshape(-1, logits.shape[-1]), blocks[:5, 1:].reshape(-1)).item(), rel=1e-5
    )


def test_triton_view_matches_the_torch_view(tiny_model, blocks):
    # head_dim 64: o_proj runs the grouped integer GEMM; down_proj the fused Hadamard + quant kernel.
    small = blocks[:2, :17]
    ppl_torch = perplexity(tiny_model, small, "w4a4kv4+had", backend="torch")
    ppl_triton = perplexity(tiny_model, small, "w4a4kv4+had", backend="triton")
    assert ppl_triton == pytest.approx(ppl_torch, rel=1e-5)


def test_bf16_model_and_gqa():
    model = make_model(n_heads=4, n_kv_heads=2).to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16))
    with quantized(model, "w4a4kv4+had"):
        out = model(ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_config_presets_and_errors():
    cfg = QuantConfig.from_preset("w4a4kv4+had")
    assert (cfg.w_bits, cfg.a_bits, cfg.kv_bits, cfg.down_hadamard) == (4, 4, 4, True)
    assert cfg.name == "w4a4kv4+had"
    assert QuantConfig.from_preset("w16a4").kv_bits == 16
    assert QuantConfig.from_preset("w4a16").name == "w4a16"
    assert QuantConfig.from_preset("fp").is_identity
    assert QuantConfig.resolve({"preset": "w4a4kv4", "a_clip": 0.9}).a_clip == 0.9
    assert QuantConfig.from_preset("w4a4kv4+had+gptq").w_method == "gptq"
    with pytest.raises(ValueError, match="unknown quant preset"):
        QuantConfig.from_preset("int4")
    with pytest.raises(ValueError, match="w_bits"):
        QuantConfig(w_bits=1)
    with pytest.raises(ValueError, match="quant.wbits is not a quant setting"):
        QuantConfig.from_dict({"wbits": 4})


def test_k_hadamard_needs_power_of_two_head_dim():
    model = Transformer(ModelConfig(vocab_size=64, d_model=96, n_layers=1, n_heads=2, max_seq_len=16))
    with pytest.raises(ValueError, match="power-of-two head_dim"), quantized(model, "w4a4kv4"):
        pass
    with quantized(model, QuantConfig(k_hadamard=False)):
        assert torch.isfinite(model(torch.randint(0, 64, (1, 8)))).all()
