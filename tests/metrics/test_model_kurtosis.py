"""Model-level outlier statistics on a tiny osp Transformer: modes, chunking, hooks, mode restore."""

import pytest
import torch
from torch import nn

from osp.metrics import evaluate_kurtosis, excess_kurtosis, model_kurtosis, outlier_stats
from osp.model import ModelConfig, Transformer


@pytest.fixture
def model() -> Transformer:
    # A larger init makes attention mix tokens visibly, so context and osp_exact differ.
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, init_std=0.2)
    return Transformer(cfg)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 8))


def test_osp_exact_equals_running_each_token_alone(model, ids):
    result = model_kurtosis(model, ids, "osp_exact")
    with torch.no_grad():
        alone = [model(token.view(1, 1), output_hidden_states=True)[1] for token in ids.flatten()]
    expected = [
        torch.stack([excess_kurtosis(taps[i]) for taps in alone]).mean().item() for i in range(len(alone[0]))
    ]
    assert len(result["per_tap"]) == model.cfg.n_layers + 1
    assert result["per_tap"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert result["mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_context_mode_differs_after_the_embedding(model, ids):
    context = model_kurtosis(model, ids, "context")
    exact = model_kurtosis(model, ids, "osp_exact")
    with torch.no_grad():
        taps = model(ids, output_hidden_states=True)[1]
    assert context["per_tap"] == pytest.approx([excess_kurtosis(h).item() for h in taps], rel=1e-5, abs=1e-6)
    # Tap 0 is the embedding lookup: no context involved, identical in both modes.
    assert context["per_tap"][0] == pytest.approx(exact["per_tap"][0], rel=1e-6)
    # Later taps see attention over the prefix in context mode only (the first token of each row
    # sees nothing else, so per-token values agree there and differ for the rest).
    pairs = zip(context["unclamped_per_tap"][1:], exact["unclamped_per_tap"][1:], strict=True)
    later = [abs(c - e) for c, e in pairs]
    assert max(later) > 1e-3


def test_chunking_does_not_change_results(model, ids):
    whole = outlier_stats(model, ids, "context", max_tokens=None)
    chunked = outlier_stats(model, ids, "context", max_tokens=8)  # one row per forward
    for key in ("kurtosis", "kurtosis_unclamped", "max_abs", "max_median", "channel_kurtosis"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
    exact_whole = model_kurtosis(model, ids, "osp_exact", max_tokens=None)
    exact_chunked = model_kurtosis(model, ids, "osp_exact", max_tokens=3)
    assert exact_chunked["per_tap"] == pytest.approx(exact_whole["per_tap"], rel=1e-5, abs=1e-6)


def test_outlier_stats_shape_and_train_mode_restored(model, ids):
    model.train()
    stats = outlier_stats(model, ids)
    assert model.training
    assert stats["n_taps"] == 3 and stats["n_tokens"] == ids.numel() and stats["d"] == 32
    assert all(len(stats[key]) == 3 for key in ("kurtosis", "max_abs", "max_median", "channel_kurtosis"))
    model.eval()
    evaluate_kurtosis(model, ids)
    assert not model.training


def test_evaluate_kurtosis_reports_floor_and_ratios(model, ids):
    result = evaluate_kurtosis(model, ids, "osp_exact")
    assert result["feed"] == "osp_exact" and result["d"] == 32
    assert result["floor_ratio"] == pytest.approx(result["mean"] / result["floor"])
    assert result["fraction_of_max"] == pytest.approx(result["mean"] / 29)
    assert result["max"] == max(result["per_tap"])


def test_linear_inputs_are_measured_and_hooks_removed(model, ids):
    stats = outlier_stats(model, ids, linear_inputs=True)
    sites = stats["linear_inputs"]
    # q/k/v share one input (and gate/up another): one site each, named after the first reader.
    assert sorted(sites) == sorted(
        f"block_{b:02d}.{name}" for b in range(2)
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    )
    assert all(not m._forward_pre_hooks for m in model.modules() if isinstance(m, nn.Linear))
    # The q_proj input of block 0 is the normed embedding output: its kurtosis equals that of the
    # normalized tap 0 (RMSNorm only rescales each token).
    assert sites["block_00.self_attn.q_proj"]["kurtosis"] == pytest.approx(stats["kurtosis"][0], rel=1e-3)


def test_bad_feed_and_shape(model, ids):
    with pytest.raises(ValueError, match="feed"):
        outlier_stats(model, ids, "sideways")
    with pytest.raises(ValueError, match="batch, seq_len"):
        outlier_stats(model, ids.flatten())


def test_transformers_llama_is_measured_the_same_way(ids):
    """A Hugging Face causal LM (what OSP's script measured) goes through the same code path."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(cfg)
    exact = model_kurtosis(model, ids, "osp_exact")
    with torch.no_grad():
        tokens = ids.flatten()[:4]
        alone = [model(token.view(1, 1), output_hidden_states=True).hidden_states for token in tokens]
    first = model_kurtosis(model, tokens.view(1, 4), "osp_exact")
    expected = [torch.stack([excess_kurtosis(taps[i]) for taps in alone]).mean().item() for i in range(3)]
    assert len(exact["per_tap"]) == 3
    assert first["per_tap"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    stats = outlier_stats(model, ids, linear_inputs=True)
    assert "block_01.mlp.down_proj" in stats["linear_inputs"]
