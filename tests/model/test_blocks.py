"""The outlier-safe blocks: exact equivalences, gate semantics and init, export flags, roles, config errors,
and gradients reaching every gate and gain."""

import math

import pytest
import torch

from osp.errors import ConfigError
from osp.model import CHOICES, ModelConfig, Transformer, merge_emb_proj
from osp.model.attention import ATTENTION_CORES, ATTENTION_GATES, Attention
from osp.model.norms import NORMS, GatedNorm, PreAffine, RMSNorm, SingleScaleRMSNorm, rms_normalize


def tiny_cfg(**overrides) -> ModelConfig:
    values = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    values.update(overrides)
    return ModelConfig(**values)


def test_registries_agree_with_config_choices():
    assert tuple(NORMS) == CHOICES["norm"]
    assert tuple(ATTENTION_CORES) == CHOICES["attn_softmax"]
    assert tuple(ATTENTION_GATES) == CHOICES["attn_gate"]


# ---- exact equivalences ---------------------------------------------------------------------------------


def test_ssnorm_with_gain_g_equals_rmsnorm_with_weight_g_times_ones():
    x = 3.0 * torch.randn(4, 7, 64)
    ss, rms = SingleScaleRMSNorm(64), RMSNorm(64)
    with torch.no_grad():
        ss.weight.fill_(-1.7)
        rms.weight.fill_(-1.7)
    assert torch.equal(ss(x), rms(x))
    assert torch.equal(ss.llama_weight(), torch.full((64,), -1.7))


@pytest.mark.parametrize("norm", ["ss", "rms"])
def test_merged_emb_proj_gives_the_same_logits_as_a_plain_llama(norm):
    """E' = E R1^T, W_head' = W_head R2 in a plain model (emb_proj off, per-channel RMSNorm weights from
    `llama_weight()`). fp32 forward, merge in fp64: on logits up to ~15 the difference is ~1e-5 (fp32
    rounding of a different summation order); the test allows atol 5e-5 + rtol 1e-5."""
    cfg = tiny_cfg(norm=norm, emb_proj=True)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # move away from the init: non-orthogonal maps, non-unit gains, larger logits
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for module in model.modules():
            if isinstance(module, (RMSNorm, SingleScaleRMSNorm)):
                module.weight.mul_(1.0 + torch.rand_like(module.weight))
        model.lm_head.weight.mul_(5.0)
    plain = Transformer(tiny_cfg(norm="rms", emb_proj=False)).eval()
    state = {k: v for k, v in model.state_dict().items() if "emb_proj" not in k and "layernorm" not in k
             and k != "norm.weight"}
    state["embed_tokens.weight"], state["lm_head.weight"] = merge_emb_proj(
        model.embed_tokens.weight, model.lm_head.weight, model.emb_proj_in.weight, model.emb_proj_out.weight)
    for name, module in model.named_modules():
        if isinstance(module, (RMSNorm, SingleScaleRMSNorm)):
            state[f"{name}.weight"] = module.llama_weight()
    plain.load_state_dict(state)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    logits, taps = model(ids, output_hidden_states=True)
    plain_logits, plain_taps = plain(ids, output_hidden_states=True)
    assert logits.abs().max() > 5.0
    assert torch.allclose(plain_logits, logits, atol=5e-5, rtol=1e-5)
    # The merged model's embedding tap is E' = the EmbProj output: kurtosis is measured at the same point.
    assert torch.allclose(plain_taps[0], taps[0], atol=1e-6)


def test_pre_affine_is_norm_of_lambda_times_x():
    x = torch.randn(3, 5, 64)
    norm = PreAffine(RMSNorm(64), 64)
    with torch.no_grad():
        norm.pre_scale.copy_(torch.rand(64) + 0.5)
        norm.norm.weight.copy_(torch.randn(64))
    assert torch.allclose(norm(x), norm.norm.weight * rms_normalize(norm.pre_scale * x, 1e-6))
    assert PreAffine(RMSNorm(8), 8).pre_scale.detach().eq(1).all()


def test_gated_norm_formula_and_init():
    model = Transformer(tiny_cfg(gated_norm_rank=16, d_model=128))
    norm = model.layers[0].input_layernorm
    assert isinstance(norm, GatedNorm) and norm.gate_down.weight.shape == (16, 128)
    x = torch.randn(2, 9, 128)
    y = norm.norm(x)
    gate = torch.sigmoid(norm.gate_up(torch.nn.functional.silu(norm.gate_down(y))))
    assert torch.allclose(norm(x), gate * y)
    # Init: the gate starts near 0.5 everywhere (W_down, W_up ~ N(0, init_std)).
    assert (gate - 0.5).abs().max() < 0.05
    # Every norm is gated, the final one too.
    assert all(isinstance(m, GatedNorm) for m in (model.norm, model.layers[1].post_attention_layernorm))


# ---- attention gates ------------------------------------------------------------------------------------


def gate_values(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """The gate tensor (B, H, T, D) that `attn.gate` multiplies the attention output with."""
    b, t, _ = x.shape
    return attn.gate(torch.ones(b, attn.n_heads, t, attn.head_dim), x)


@pytest.mark.parametrize("gate_hidden", [0, 8])
def test_head_slice_gate_uses_only_its_heads_slice_and_starts_at_gate_init(gate_hidden):
    cfg = tiny_cfg(attn_gate="head_slice", gate_hidden=gate_hidden, gate_init=0.25)
    attn = Transformer(cfg).layers[0].self_attn
    x = torch.randn(2, 6, cfg.d_model)
    gates = gate_values(attn, x)
    assert (gates - 0.25).abs().max() < 0.1
    x2 = x.clone()
    x2[..., cfg.head_dim:2 * cfg.head_dim] += 3.0  # head 1's slice only
    changed = (gate_values(attn, x2) != gates).flatten(2).any(-1)  # (B, H)
    assert changed[:, 1].all() and not changed[:, [0, 2, 3]].any()
    if gate_hidden == 0:
        assert attn.head_gates[0].bias.item() == pytest.approx(math.log(0.25 / 0.75))
    else:
        assert attn.head_gates[0][0].weight.shape == (8, cfg.head_dim)
        assert attn.head_gates[0][-1].bias.item() == pytest.approx(math.log(0.25 / 0.75))


def test_head_slice_gate_with_zero_weights_scales_the_output_by_gate_init():
    cfg = tiny_cfg(attn_gate="head_slice", gate_init=0.3)
    gated = Transformer(cfg).layers[0].self_attn
    plain = Attention(tiny_cfg())
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "head_gates" not in k})
    with torch.no_grad():
        for g in gated.head_gates:
            g.weight.zero_()
    x = torch.randn(2, 10, cfg.d_model)
    model = Transformer(tiny_cfg())
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    assert torch.allclose(gated(x, cos, sin), 0.3 * plain(x, cos, sin), atol=1e-6)


@pytest.mark.parametrize("kind, per_head", [("headwise", 1), ("elementwise", 16)])
def test_qwen_gate_is_sigmoid_of_normed_input_per_head_or_channel(kind, per_head):
    cfg = tiny_cfg(attn_gate=kind)
    attn = Transformer(cfg).layers[0].self_attn
    assert attn.gate_proj.weight.shape == (cfg.n_heads * per_head, cfg.d_model)
    assert attn.gate_proj.bias is None
    x = torch.randn(2, 5, cfg.d_model)
    expected = torch.sigmoid(x @ attn.gate_proj.weight.T).view(2, 5, cfg.n_heads, per_head).transpose(1, 2)
    assert torch.allclose(gate_values(attn, x), expected.expand(-1, -1, -1, cfg.head_dim))
    assert (expected - 0.5).abs().max() < 0.15  # default init: gate ~ sigmoid(0)


# ---- export flags and optimizer roles -------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, blockers",
    [
        (dict(), []),
        (dict(norm="ss", emb_proj=True), []),
        (dict(attn_softmax="clipped", clip_alpha=4.0),
         ["layers.0.self_attn.core", "layers.1.self_attn.core"]),
        (dict(attn_gate="head_slice"), ["layers.0.self_attn", "layers.1.self_attn"]),
        (dict(attn_gate="headwise"), ["layers.0.self_attn", "layers.1.self_attn"]),
        (dict(attn_gate="elementwise"), ["layers.0.self_attn", "layers.1.self_attn"]),
        (dict(gated_norm_rank=4), ["layers.0.input_layernorm", "layers.0.post_attention_layernorm",
                                   "layers.1.input_layernorm", "layers.1.post_attention_layernorm", "norm"]),
        (dict(pre_affine=True, n_layers=1), ["layers.0.input_layernorm", "layers.0.post_attention_layernorm",
                                             "norm"]),
    ],
)
def test_llama_compatible_lists_the_blocks_that_do_not_fold(overrides, blockers):
    ok, names = Transformer(tiny_cfg(**overrides)).llama_compatible()
    assert ok == (not blockers)
    assert names == blockers


def test_folding_flags_of_the_plain_blocks():
    model = Transformer(tiny_cfg(norm="ss", emb_proj=True))
    for module in (model.norm, model.emb_proj_in, model.emb_proj_out, model.layers[0].mlp,
                   model.layers[0].self_attn, model.layers[0].self_attn.core):
        assert type(module).folds_into_llama is True


def test_roles_of_gates_and_gains():
    model = Transformer(tiny_cfg(attn_gate="head_slice", gated_norm_rank=4, pre_affine=True, norm="ss"))
    roles = model.parameter_roles()
    assert roles["layers.0.self_attn.head_gates.0.weight"] == "matrix"
    assert roles["layers.0.self_attn.head_gates.0.bias"] == "bias"
    assert roles["layers.0.input_layernorm.gate_down.weight"] == "matrix"
    assert roles["norm.gate_up.weight"] == "matrix"
    assert roles["layers.0.input_layernorm.norm.pre_scale"] == "gain"
    assert roles["layers.0.input_layernorm.norm.norm.weight"] == "gain"
    qwen = Transformer(tiny_cfg(attn_gate="elementwise")).parameter_roles()
    assert qwen["layers.1.self_attn.gate_proj.weight"] == "matrix"


# ---- gradients ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(norm="ss", emb_proj=True, attn_gate="head_slice", gate_hidden=8, attn_softmax="clipped",
             clip_alpha=2.0, gated_norm_rank=4, pre_affine=True),
        dict(attn_gate="head_slice"),
        dict(attn_gate="headwise", gated_norm_rank=8),
        dict(norm="ss", attn_gate="elementwise", pre_affine=True, attn_softmax="clipped", clip_gamma=-0.03,
             clip_zeta=1.03),
    ],
)
def test_every_parameter_gets_a_gradient(overrides):
    model = Transformer(tiny_cfg(**overrides))
    ids = torch.randint(0, 97, (2, 20))
    torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


# ---- configuration errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attn_gate="headwise", gate_hidden=8),
         "model.gate_hidden=8 applies only to model.attn_gate=head_slice"),
        (dict(gate_hidden=-1, attn_gate="head_slice"), "model.gate_hidden must be >= 0"),
        (dict(clip_alpha=12.0), "model.clip_alpha only apply with model.attn_softmax=clipped"),
        (dict(clip_gamma=-0.1, clip_zeta=1.1), "model.clip_gamma, model.clip_zeta only apply with"),
        (dict(attn_softmax="clipped", clip_alpha=-1.0), "model.clip_alpha must be >= 0"),
        (dict(attn_softmax="clipped"), "needs model.clip_gamma or model.clip_alpha"),
        (dict(attn_softmax="clipped", clip_gamma=-0.1, clip_alpha=1.0),
         "either model.clip_gamma or model.clip_alpha"),
        (dict(attn_gate="sigmoid"), "model.attn_gate='sigmoid' is not allowed"),
        (dict(gated_norm_rank=-2), "model.gated_norm_rank must be >= 0"),
        (dict(gate_init=1.0), "model.gate_init must lie in"),
    ],
)
def test_config_errors_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_cfg(**overrides)
