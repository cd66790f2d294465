"""Per-channel smoothing (`+smooth`, Smooth-SwiGLU): the scale formula, the exactness of the view without
quantization, and that folding the scales into an exported model gives what the view measures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from osp.errors import QuantConfigError
from osp.export import export_hf, load_model
from osp.model import Transformer
from osp.quant import QuantConfig, nll_stats, quantized
from osp.quant.smooth import FLOOR, down_proj_groups, smooth_groups, smooth_scale, trained_smoothing
from osp.quant.w4a4 import smoothing_of
from tests.support.models import make_model


def _heavy_down_proj_input(model: Transformer) -> None:
    """Give channel 3 of every SwiGLU product a large scale (and the norm outputs channel 5), as trained
    models have: something for smoothing to act on."""
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.up_proj.weight[3] *= 40.0
            if hasattr(layer.input_layernorm.weight, "__len__") and layer.input_layernorm.weight.numel() > 1:
                layer.input_layernorm.weight[5] = 30.0


def test_the_smooth_preset_parses_and_needs_calibration(tiny_model, blocks):
    cfg = QuantConfig.from_preset("w4a4kv4+smooth+static")
    assert cfg.smooth_alpha == 0.5 and cfg.needs_calibration and cfg.name == "w4a4kv4+smooth+static"
    assert QuantConfig.from_preset("W4A4KV4+had+smooth").name == "w4a4kv4+smooth+had"
    assert not QuantConfig.from_preset("w16a16+smooth").is_identity
    with pytest.raises(QuantConfigError, match="smooth_alpha"):
        QuantConfig.from_preset("w4a4kv4+smooth", smooth_alpha=1.5)
    with pytest.raises(ValueError, match="calibration blocks"):
        with quantized(tiny_model, "w4a4kv4+smooth"):
            pass


def test_the_scale_is_smoothquants_formula():
    x_max = torch.tensor([8.0, 1.0, 0.0, 2.0])
    w1 = torch.tensor([[0.5, -2.0, 1.0, 0.25], [-1.0, 0.5, 0.5, 0.25]])
    w2 = torch.tensor([[4.0, 0.1, 0.1, 0.5]])
    by_hand = [8.0 ** 0.5 / 4.0 ** 0.5, 1.0 / 2.0 ** 0.5, FLOOR ** 0.5 / 1.0, 2.0 ** 0.5 / 0.5 ** 0.5]
    assert smooth_scale(x_max, [w1, w2], 0.5).tolist() == pytest.approx(by_hand, rel=1e-6)
    assert smooth_scale(x_max, [w1], 1.0).tolist() == pytest.approx([8.0, 1.0, FLOOR, 2.0], rel=1e-6)


def test_groups_are_the_readers_of_each_foldable_tensor():
    ss = smooth_groups(make_model(norm="ss"))
    assert {(g.producers, g.readers) for g in ss if "layers.0" in g.producers[0]} == {
        (("layers.0.mlp.up_proj.weight",), ("layers.0.mlp.down_proj",)),
        (("layers.0.input_layernorm.weight",),
         ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj")),
        (("layers.0.post_attention_layernorm.weight",), ("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj")),
    }
    # A gate that reads the normed input is a reader too (its columns must carry the same scale).
    gated = smooth_groups(make_model(attn_gate="elementwise"))
    attn = next(g for g in gated if g.producers == ("layers.1.input_layernorm.weight",))
    assert len(attn.readers) == 4 and all(r.startswith("layers.1.self_attn.") for r in attn.readers)
    # GatedNorm's gate sits after the gain: only the down_proj inputs fold.
    assert smooth_groups(make_model(gated_norm_rank=4)) == down_proj_groups(make_model(gated_norm_rank=4))


@pytest.mark.parametrize("norm", ["rms", "ss"])
def test_without_quantization_smoothing_changes_nothing(norm, blocks):
    model = make_model(norm=norm)
    _heavy_down_proj_input(model)
    fp, tokens = nll_stats(model, blocks, 3)
    with quantized(model, "w16a16+smooth", calib_blocks=blocks):
        smoothed, _ = nll_stats(model, blocks, 3)
    assert smoothed / tokens == pytest.approx(fp / tokens, abs=2e-6)


def test_smoothing_helps_an_outlier_channel_under_w4a4(blocks):
    model = make_model()
    _heavy_down_proj_input(model)
    fp, tokens = nll_stats(model, blocks, 3)
    cost = {}
    for preset in ("w16a4", "w16a4+smooth"):
        with quantized(model, preset, calib_blocks=blocks):
            cost[preset] = (nll_stats(model, blocks, 3)[0] - fp) / tokens
    assert cost["w16a4+smooth"] < 0.5 * cost["w16a4"]


@pytest.mark.parametrize("norm", ["rms", "ss"])
def test_the_folded_export_quantizes_as_the_smoothed_view(norm, blocks, tmp_path):
    """Independent of the view's arithmetic: export with the scales folded into the weights, load the plain
    Llama folder back, and quantize it without smoothing: the logits of the +smooth view of the original."""
    model = make_model(norm=norm)
    _heavy_down_proj_input(model)
    ids = blocks[:, :-1]
    smoothing = smoothing_of(model, "w4a4kv4+smooth", blocks, 3)
    with torch.no_grad(), quantized(model, "w4a4kv4+smooth", smoothing=smoothing):
        view = model(ids)
    export_hf(model, tmp_path / "smoothed", smoothing=smoothing)
    folded, _ = load_model(tmp_path / "smoothed")
    with torch.no_grad(), quantized(folded, "w4a4kv4"):
        exported = folded(ids)
    with torch.no_grad(), quantized(model, "w4a4kv4"):
        plain = model(ids)
    # The view quantizes what the folded model holds (up_proj rows divided before its weights are rounded).
    assert (exported - view).abs().max() < 1e-4 < (plain - view).abs().mean()


def _train_steps(model: Transformer, blocks: torch.Tensor, steps: int) -> list[float]:
    torch.manual_seed(3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for step in range(steps):
        batch = blocks[step % 2 * 3:(step % 2 + 1) * 3]
        loss = nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_smooth_swiglu_trains_identically_and_tracks_the_channel_max(blocks):
    plain, smooth = make_model(), make_model(smooth_swiglu=True)
    assert trained_smoothing(smooth) == []  # nothing tracked before the first training step
    assert _train_steps(plain, blocks, 4) == _train_steps(smooth, blocks, 4)
    for a, b in zip(plain.parameters(), smooth.parameters()):
        assert torch.equal(a, b)
    # The buffer is a moving average of each step's per-channel max |silu(gate(x)) * up(x)|.
    layer = smooth.layers[0].mlp
    seen = []
    hook = layer.down_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].abs().flatten(0, 1).amax(0)))
    before = layer.output_absmax.clone()
    _train_steps(smooth, blocks, 1)
    hook.remove()
    assert torch.allclose(layer.output_absmax, 0.99 * before + 0.01 * seen[0].detach())
    smooth.eval()
    with torch.no_grad():
        smooth(blocks[:2, :-1])  # an eval forward changes nothing
    assert torch.allclose(layer.output_absmax, 0.99 * before + 0.01 * seen[0].detach())


def test_smooth_swiglu_exports_folded_and_the_view_measures_the_export(blocks, tmp_path):
    model = make_model(smooth_swiglu=True)
    _train_steps(model, blocks, 3)
    _heavy_down_proj_input(model)
    model.eval()
    with quantized(model, "w4a4kv4"):  # applies the trained down_proj scales
        view, tokens = nll_stats(model, blocks, 3)
    export_hf(model, tmp_path / "export")
    folded, _ = load_model(tmp_path / "export")
    assert not any("output_absmax" in name for name in folded.state_dict())
    with quantized(folded, "w4a4kv4"):
        exported, _ = nll_stats(folded, blocks, 3)
    assert exported / tokens == pytest.approx(view / tokens, abs=1e-5)
    fp, _ = nll_stats(model, blocks, 3)
    assert nll_stats(folded, blocks, 3)[0] / tokens == pytest.approx(fp / tokens, abs=1e-5)
