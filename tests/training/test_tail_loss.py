"""The FFN tail loss: the penalty against a by-hand computation, and what training adds to the objective."""

from __future__ import annotations

import pytest
import torch

from osp.model import ModelConfig
from osp.training.module import LanguageModelModule, next_token_loss
from osp.training.tail_loss import TailLoss, TailLossConfig, tail_penalty
from tests.support.models import make_model


def by_hand(h: torch.Tensor, threshold: float, per_token: bool) -> float:
    rows = h.reshape(-1, h.shape[-1]).double()
    total, count = 0.0, 0
    tensor_rms = float(rows.pow(2).mean().sqrt())
    for row in rows:
        rms = float(row.pow(2).mean().sqrt()) if per_token else tensor_rms
        for value in row.tolist():
            total += max(abs(value) / rms - threshold, 0.0) ** 2
            count += 1
    return total / count


@pytest.mark.parametrize("scale", ["token", "tensor"])
def test_the_penalty_is_the_squared_excess_over_threshold_times_the_rms(scale):
    h = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    h[1, 2, 7] = 40.0  # one token with a spike
    h[2] *= 9.0  # and one loud sequence
    for threshold in (0.0, 2.0, 4.0):
        assert float(tail_penalty(h, threshold, scale)) == pytest.approx(
            by_hand(h, threshold, scale == "token"), rel=1e-5)
    # The scale cannot be escaped by rescaling the input, and Gaussian rows pay (almost) nothing at 4 RMS.
    assert float(tail_penalty(h * 1e3, 4.0, scale)) == pytest.approx(float(tail_penalty(h, 4.0, scale)),
                                                                     rel=1e-5)
    assert float(tail_penalty(torch.randn(64, 768), 4.0, scale)) < 1e-5


@pytest.mark.parametrize(("key", "value"), [("ffn_tail_weight", -1.0), ("ffn_tail_threshold", "x"),
                                            ("ffn_tail_scale", "channel"), ("ffn_tail_weight", True),
                                            ("ffn_tail_token_stride", 0), ("ffn_tail_token_stride", 2.5)])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"loss.{key}"):
        TailLossConfig(**{key: value})


@pytest.mark.parametrize(("stride", "step"), [(1, 0), (4, 0), (4, 7)])
def test_only_forwards_under_collecting_count_on_every_strided_token(stride, step):
    model = make_model()
    tail = TailLoss(model, TailLossConfig(ffn_tail_weight=0.5, ffn_tail_token_stride=stride))
    ids = torch.randint(0, 128, (2, 16))
    model(ids)  # not collecting: e.g. validation, the callbacks, an activation-checkpointing recompute
    with pytest.raises(RuntimeError, match="collecting"):
        tail.total()
    inputs = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
             for layer in model.layers]
    with tail.collecting(step):
        model(ids)
    # The tokens step % stride, step % stride + stride, ... of the flattened (batch x time) tokens.
    picked = [x.detach().reshape(-1, x.shape[-1])[[i for i in range(32) if i % stride == step % stride]]
              for x in inputs]
    expected = 0.5 * sum(float(tail_penalty(x, 4.0)) for x in picked) / len(picked)
    assert float(tail.total().detach()) == pytest.approx(expected, rel=1e-6)
    tail.remove()
    for hook in hooks:
        hook.remove()
    assert not any(layer.mlp.down_proj._forward_pre_hooks for layer in model.layers)


def test_the_training_objective_adds_the_weighted_penalty_and_logs_the_cross_entropy(monkeypatch):
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=2, ffn_hidden=128, max_seq_len=32)
    plain = LanguageModelModule(cfg, {"name": "adamw"})
    assert plain.tail_loss is None and not any(layer.mlp.down_proj._forward_pre_hooks
                                               for layer in plain.model.layers)
    module = LanguageModelModule(cfg, {"name": "adamw"}, loss={"ffn_tail_weight": 2.0,
                                                               "ffn_tail_threshold": 1.0,
                                                               "ffn_tail_token_stride": 1})
    logged = {}

    def log(key, value, **_):
        logged[key] = float(value.detach() if torch.is_tensor(value) else value)

    monkeypatch.setattr(module, "log", log)
    monkeypatch.setattr(LanguageModelModule, "trainer", type("T", (), {"world_size": 1})(), raising=False)
    batch = torch.randint(0, 128, (2, 17))
    objective = module.training_step(batch, 0)
    inputs = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
             for layer in module.model.layers]
    with torch.no_grad():
        ce = next_token_loss(module.model(batch[:, :-1]), batch[:, 1:])
    for hook in hooks:
        hook.remove()
    penalty = 2.0 * sum(float(tail_penalty(x.detach(), 1.0)) for x in inputs) / len(inputs)
    assert penalty > 0
    assert float(objective.detach()) == pytest.approx(float(ce) + penalty, rel=1e-6)
    assert logged["train/loss"] == pytest.approx(float(ce), rel=1e-6)
    assert logged["train/ffn_tail"] == pytest.approx(penalty, rel=1e-6)
