"""Static per-tensor activation scales (`+static`) and per-site attribution of the quantized view's cost."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from osp.errors import QuantConfigError
from osp.quant import QuantConfig, QuantLinear, nll_stats, quantized
from osp.quant.attribution import attribute, format_attribution, input_statistics
from osp.quant.w4a4 import site_names
from tests.support.models import make_model


def _inputs(model: nn.Module, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every linear's input inside the blocks on one forward pass (independent of the view's own hooks)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_pre_hook(
                 lambda m, args, name=name: seen.__setitem__(name, args[0].detach()))
             for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.startswith("layers.")]
    with torch.no_grad():
        model(blocks[:, :-1])
    for hook in hooks:
        hook.remove()
    return seen


def test_the_static_preset_parses_and_needs_calibration(tiny_model, blocks):
    cfg = QuantConfig.from_preset("w8a8+static")
    assert cfg.a_static and cfg.needs_calibration and cfg.name == "w8a8+static"
    assert QuantConfig.from_preset("w4a4kv4+had+static").name == "w4a4kv4+had+static"
    with pytest.raises(QuantConfigError, match="a_static needs quantized activations"):
        QuantConfig.from_preset("w4a16+static")
    with pytest.raises(ValueError, match="static activation scales need calibration blocks"):
        with quantized(tiny_model, cfg):
            pass


def test_static_scales_are_the_calibration_absmax_over_the_grid(tiny_model, blocks):
    """Each linear sees clamp(round(x / s)) * s with s = max |x| over the calibration blocks / 127 (A8)."""
    calib, held = blocks[:4], blocks[4:]
    fp_calib = _inputs(tiny_model, calib)
    fp_held = _inputs(tiny_model, held)
    scales = {name: float(x.abs().max()) / 127 for name, x in fp_calib.items()}
    got: dict[str, torch.Tensor] = {}
    with quantized(tiny_model, "w16a8+static", calib_blocks=calib) as model:
        wrappers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        assert set(wrappers) == set(scales)
        for name, wrapper in wrappers.items():
            assert wrapper.act.static_scale == pytest.approx(scales[name], rel=1e-6)
        # The first linear of block 0 gets exactly the fp input: check its quantized output independently.
        name = "layers.0.self_attn.q_proj"
        inner = wrappers[name].inner
        x = fp_held[name]
        expected = nn.functional.linear((x / scales[name]).round().clamp(-128, 127) * scales[name],
                                        inner.weight)
        hook = wrappers[name].register_forward_hook(lambda m, a, out: got.__setitem__("q", out.detach()))
        with torch.no_grad():
            model(held[:, :-1])
        hook.remove()
    torch.testing.assert_close(got["q"], expected, rtol=1e-5, atol=1e-6)


def test_one_outlier_channel_breaks_static_scales_but_not_per_token_ones(blocks):
    """The deployment fact the `+static` presets measure: a channel 100x the rest sets the whole tensor's
    scale, so A8 static loses the other channels, while per-token A8 keeps them within a token's own range."""
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    x[:5, 7] = 800.0  # five tokens with a massive activation in one channel
    static_scale = float(x.abs().max()) / 127
    static = (x / static_scale).round().clamp(-128, 127) * static_scale
    per_token = QuantConfig.from_preset("w16a8")
    from osp.quant import fake_quant

    dynamic = fake_quant(x, 8, per_token.a_sym)
    rest = torch.ones_like(x, dtype=torch.bool)
    rest[:5] = False  # the tokens without the outlier
    static_err = ((static - x)[rest] ** 2).mean() / (x[rest] ** 2).mean()
    dynamic_err = ((dynamic - x)[rest] ** 2).mean() / (x[rest] ** 2).mean()
    assert static_err > 0.1 > 1e-3 > dynamic_err


def test_only_restricts_the_view_to_the_named_sites(tiny_model, blocks):
    names = site_names(tiny_model)
    assert names[:8] == ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj",
                         "layers.0.self_attn.v_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.gate_proj",
                         "layers.0.mlp.up_proj", "layers.0.mlp.down_proj", "layers.0.kv"]
    assert len(names) == 16
    chosen = {"layers.1.mlp.down_proj", "layers.0.kv"}
    with quantized(tiny_model, "w4a4kv4", only=chosen.__contains__) as model:
        wrapped = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
        assert wrapped == ["layers.1.mlp.down_proj"]
        assert (model.layers[0].self_attn.kv_quantizer is not None
                and model.layers[1].self_attn.kv_quantizer is None)
    assert not any(isinstance(m, QuantLinear) for m in tiny_model.modules())
    # Nothing selected: exactly the full-precision model.
    nll_fp = nll_stats(tiny_model, blocks)[0]
    with quantized(tiny_model, "w4a4kv4", only=lambda name: False):
        assert nll_stats(tiny_model, blocks)[0] == nll_fp


def test_each_site_costs_what_quantizing_its_input_alone_costs(blocks):
    """w16a4: a site's row is the NLL with only that linear's input 4-bit per token, computed here with a
    plain forward pre-hook; its input statistics flag the site whose input has an outlier channel."""
    from osp.quant import fake_quant

    model = make_model()
    with torch.no_grad():  # one input channel of block 1's MLP 60x the others
        model.layers[1].post_attention_layernorm.weight[5] = 60.0
    result = attribute(model, blocks, "w16a4")
    rows = {row["name"]: row for row in result["sites"]}
    nll_fp, tokens = nll_stats(model, blocks)
    assert result["nll_fp"] == pytest.approx(nll_fp / tokens)
    for name in ("layers.1.mlp.up_proj", "layers.0.self_attn.o_proj"):
        linear = model.get_submodule(name)
        # o_proj input in groups of head_dim (d 128 / 2 heads)
        groups = 64 if name.endswith("o_proj") else None
        hook = linear.register_forward_pre_hook(
            lambda m, args: (fake_quant(args[0], 4, False, groups, 1.0, groups is None),))
        by_hand = nll_stats(model, blocks)[0] / tokens
        hook.remove()
        assert rows[name]["nll"] == pytest.approx(by_hand, rel=1e-6), name
        assert rows[name]["ppl_ratio"] == pytest.approx(math.exp(by_hand - nll_fp / tokens), rel=1e-6)
    assert rows["layers.1.kv"]["delta_nll"] == 0.0  # w16a4 keeps K/V in full precision
    stats = input_statistics(model, blocks)
    worst = max(stats, key=lambda name: stats[name]["kurtosis"])
    assert worst in ("layers.1.mlp.gate_proj", "layers.1.mlp.up_proj") and stats[worst]["kurtosis"] > 50
    assert rows[worst]["kurtosis"] == stats[worst]["kurtosis"]
    for row in result["sites"]:
        assert row["share"] == pytest.approx(row["delta_nll"] / math.log(result["ppl_ratio"]))
    assert [r["delta_nll"] for r in result["sites"]] == sorted((r["delta_nll"] for r in result["sites"]),
                                                               reverse=True)
    assert len(result["sites"]) == 16 and len(result["layers"]) == 2 and len(result["kinds"]) == 8
    text = format_attribution(result, top=3)
    assert result["sites"][0]["name"] in text.splitlines()[4] and "ppl x" in text


def test_a_calibration_passed_in_gives_the_same_view(tiny_model, blocks):
    """attribute calibrates a static preset once (input_absmax) and passes it to every view: the same numbers
    as each view calibrating itself."""
    from osp.quant.w4a4 import input_absmax

    calib, held = blocks[:4], blocks[4:]
    absmax = input_absmax(tiny_model, "w4a8+static", calib)
    with quantized(tiny_model, "w4a8+static", calib_blocks=calib):
        own = nll_stats(tiny_model, held)[0]
    with quantized(tiny_model, "w4a8+static", static_absmax=absmax):
        passed = nll_stats(tiny_model, held)[0]
    assert passed == own
    site = "layers.1.mlp.down_proj"
    with quantized(tiny_model, "w4a8+static", calib_blocks=calib, only=lambda name: name == site):
        alone = nll_stats(tiny_model, held)
    rows = {r["name"]: r for r in attribute(tiny_model, held, "w4a8+static", calib_blocks=calib)["sites"]}
    assert rows[site]["nll"] == pytest.approx(alone[0] / alone[1], rel=1e-12)
    with pytest.raises(ValueError, match="static activation scales need calibration blocks"):
        attribute(tiny_model, held, "w4a8+static")


def test_attribution_of_a_hadamard_preset(blocks):
    """A +had view restricted to sites without a down_proj is still a valid view (the rotation only applies
    where a down_proj is quantized); each row equals that restricted view's NLL."""
    model = make_model()
    result = attribute(model, blocks, "w16a4+had")
    rows = {row["name"]: row for row in result["sites"]}
    _, tokens = nll_stats(model, blocks)
    for name in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"):
        with quantized(model, "w16a4+had", only=lambda site, name=name: site == name):
            assert rows[name]["nll"] == pytest.approx(nll_stats(model, blocks)[0] / tokens, rel=1e-6)
