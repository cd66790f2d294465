import math

import pytest
import torch

from osp.errors import ConfigError
from osp.model import ModelConfig, Transformer
from osp.model.attention import apply_rope, rope_tables


def tiny_cfg(**overrides) -> ModelConfig:
    values = dict(vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32)
    values.update(overrides)
    return ModelConfig(**values)


def test_shapes_and_taps():
    cfg = tiny_cfg()
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    logits, taps = model(ids, output_hidden_states=True)
    assert logits.shape == (2, 16, cfg.vocab_size)
    assert len(taps) == cfg.n_layers + 1
    assert all(t.shape == (2, 16, cfg.d_model) for t in taps)
    assert torch.equal(taps[0], model.embed_tokens(ids))
    # The last tap is the final-norm output: the head applied to it gives the logits.
    assert torch.allclose(model.lm_head(taps[-1]), logits, atol=1e-6)


def test_causality_later_tokens_never_change_earlier_logits():
    model = Transformer(tiny_cfg()).eval()
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    a, b = model(ids), model(changed)
    assert torch.equal(a[0, :12], b[0, :12])
    assert not torch.allclose(a[0, 12:], b[0, 12:])


def test_rope_matches_complex_rotation():
    head_dim, t = 8, 5
    cos, sin = rope_tables(head_dim, t, theta=10000.0)
    x = torch.randn(1, 1, t, head_dim, dtype=torch.float64)
    got = apply_rope(x, cos.double(), sin.double())
    half = head_dim // 2
    z = torch.complex(x[..., :half], x[..., half:])  # pair i with i + d/2 (half-split layout)
    freqs = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * freqs[None, :]
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    expected = torch.cat([rotated.real, rotated.imag], dim=-1)
    assert torch.allclose(got, expected, atol=1e-6)


def test_matches_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny_cfg(n_layers=2)
    model = Transformer(cfg).eval()
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
             for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    logits, taps = model(ids, output_hidden_states=True)
    out = hf(ids, output_hidden_states=True)
    assert torch.allclose(logits, out.logits, atol=1e-5)
    for mine, theirs in zip(taps, out.hidden_states, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-5)


def test_parameter_roles():
    model = Transformer(tiny_cfg(emb_proj=True, norm="ss"))
    roles = model.parameter_roles()
    assert roles["embed_tokens.weight"] == "embedding"
    assert roles["lm_head.weight"] == "head"
    assert roles["emb_proj_in.weight"] == "matrix" and roles["emb_proj_out.weight"] == "matrix"
    assert roles["layers.0.self_attn.q_proj.weight"] == "matrix"
    assert roles["layers.0.input_layernorm.weight"] == "gain"
    assert set(roles) == {n for n, _ in model.named_parameters()}


def test_tied_embeddings_share_storage_and_roles():
    model = Transformer(tiny_cfg(tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.parameter_roles()["embed_tokens.weight"] == "embedding"
    assert "lm_head.weight" not in model.parameter_roles()


def test_scaled_init_shrinks_output_projections():
    cfg = tiny_cfg(d_model=128, n_layers=8, init_std=0.02)
    model = Transformer(cfg)
    assert model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)


def test_default_ffn_width_rounds_up():
    assert ModelConfig(d_model=256, ffn_multiple_of=64).ffn_hidden == 704
    assert ModelConfig(d_model=2048, ffn_multiple_of=128).ffn_hidden == 5504


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm="layer"), "model.norm='layer' is not allowed; choose one of ['rms', 'ss']"),
        (dict(d_model=65), "divisible by model.n_heads"),
        (dict(n_kv_heads=3), "multiple of model.n_kv_heads"),
        (dict(tie_embeddings=True, emb_proj=True), "incompatible with model.emb_proj"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError,
                       match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        tiny_cfg(**overrides)


def test_unknown_key_lists_known_ones():
    with pytest.raises(ConfigError,
                       match="model.d_modle is not a model setting; the settings: vocab_size, d_model"):
        ModelConfig.from_dict({"d_modle": 3})


def test_too_long_sequence_is_a_clear_error():
    model = Transformer(tiny_cfg(max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
