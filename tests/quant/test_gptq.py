"""GPTQ: lower output error than RTN at the same scales, sequential groups, the model-level path."""

from __future__ import annotations

import pytest
import torch

from osp.quant import QuantLinear, evaluate_quant, perplexity, quantized
from osp.quant import quantizers as Q
from osp.quant.evaluation import eval_config
from osp.quant.gptq import _first_block_inputs, _Hessian, _sequential_groups, gptq_quantize
from tests.support.models import make_model


def _correlated_inputs(n: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(k, k, generator=g) * 2 / k**0.5 + torch.eye(k)
    return torch.randn(n, k, generator=g) @ mix


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_layer_output(act_order):
    x = _correlated_inputs(1024, 96)
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    scale = Q.weight_scale(w, 4)
    rtn = Q.quantize_weight_with_scale(w, scale, 4)
    gptq = gptq_quantize(w, x.T @ x / x.shape[0], scale, 4, blocksize=32, act_order=act_order)
    assert gptq.codes.dtype == torch.int8 and gptq.codes.min() >= -8 and gptq.codes.max() <= 7
    assert torch.equal(gptq.scale, scale)

    def err(qw):
        return (x @ (qw.dequantize() - w).T).norm()

    assert err(gptq) < 0.85 * err(rtn)
    # lazy block updates are exact: one block over all columns gives the same codes
    whole = gptq_quantize(w, x.T @ x / x.shape[0], scale, 4, blocksize=96, act_order=act_order)
    assert torch.equal(whole.codes, gptq.codes)


def test_gptq_math_stays_fp32_under_a_bf16_autocast():
    # Evaluation runs in the run's precision (bf16 autocast on a CPU with native bf16); X^T X and the error
    # propagation must not follow it (a bf16 Hessian is not even positive semi-definite).
    x = _correlated_inputs(512, 64)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    scale = Q.weight_scale(w, 4)
    plain = _Hessian()
    plain.add(x)
    reference = gptq_quantize(w, plain.matrix(), scale, 4, blocksize=16)
    autocast = _Hessian()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast.add(x)
        codes = gptq_quantize(w, autocast.matrix(), scale, 4, blocksize=16).codes
    assert autocast.matrix().dtype == torch.float32 and torch.equal(autocast.matrix(), x.T @ x / x.shape[0])
    assert torch.equal(codes, reference.codes)


def test_a_hessian_that_is_not_positive_definite_is_a_config_error():
    from osp.errors import QuantConfigError

    w = torch.randn(4, 8)
    with pytest.raises(QuantConfigError, match="quant.gptq_percdamp=0.01; raise it"):
        gptq_quantize(w, -torch.eye(8), Q.weight_scale(w, 4), 4)


def test_gptq_dead_inputs_get_zero_weight():
    x = _correlated_inputs(256, 32)
    x[:, 5] = 0.0
    w = torch.randn(8, 32)
    qw = gptq_quantize(w, x.T @ x / 256, Q.weight_scale(w, 4), 4)
    assert (qw.codes[:, 5] == 0).all()


def test_sequential_groups_follow_shared_inputs():
    model = make_model()
    with quantized(model, "w4a16"):
        block = model.layers[0]
        inputs = _first_block_inputs(model, torch.randint(0, 128, (2, 9)), 2)
        assert len(inputs) == 1 and inputs[0][0].shape == (2, 8, 128)
        linears = [m for m in block.modules() if isinstance(m, QuantLinear)]
        names = {id(m): n for n, m in block.named_modules()}
        groups = [
            [names[id(m)].split(".")[-1] for m in g] for g in _sequential_groups(block, linears, inputs)
        ]
    assert [sorted(g) for g in groups] == [
        ["k_proj", "q_proj", "v_proj"],
        ["o_proj"],
        ["gate_proj", "up_proj"],
        ["down_proj"],
    ]


def test_model_level_gptq_runs_restores_and_differs_from_rtn(blocks):
    model = make_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    calib = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(7))
    with quantized(model, "w4a4kv4+had+gptq", calib_blocks=calib):
        gptq_w = model.layers[1].mlp.down_proj.weight.clone()
        assert model.layers[1].mlp.down_proj.quantize_input
    with quantized(model, "w4a4kv4+had"):
        rtn_w = model.layers[1].mlp.down_proj.weight.clone()
    assert not torch.equal(gptq_w, rtn_w)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    ppl = perplexity(model, blocks, "w4a4kv4+gptq", calib_blocks=calib)
    assert ppl == pytest.approx(perplexity(model, blocks), rel=0.2)


def test_evaluate_quant_report(blocks):
    model = make_model()
    report = evaluate_quant(model, blocks, eval_config("w4a4kv4", hadamard=True))
    assert report["preset"] == "w4a4kv4+had"
    assert report["ratio"] == pytest.approx(report["ppl_quant"] / report["ppl_fp"])
    assert report["tokens"] == blocks[:, 1:].numel()
    with pytest.raises(ValueError, match="calibration"):
        evaluate_quant(model, blocks, eval_config("w4a4kv4", gptq=True))
