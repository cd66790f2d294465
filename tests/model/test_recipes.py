"""Each mitigation recipe composes and its block choice reaches ModelConfig (a recipe whose
`# @package _global_` header is not the first line would silently land under `recipe.` instead)."""

import pytest

from osp.conf import compose
from osp.model import Transformer
from osp.training.run import build_model_config

EXPECTED = {
    "ssnorm": dict(norm="ss"),
    "embproj": dict(emb_proj=True),
    "clipped_softmax": dict(attn_softmax="clipped", clip_alpha=12.0),
    "gated_attention_head_slice": dict(attn_gate="head_slice", gate_init=0.25),
    "gated_attention_headwise": dict(attn_gate="headwise"),
    "gated_attention_elementwise": dict(attn_gate="elementwise"),
    "gated_norm": dict(gated_norm_rank=16),
    "pre_affine": dict(pre_affine=True),
    "osp_gated": dict(norm="ss", emb_proj=True, attn_gate="headwise", attn_softmax="clipped",
                      clip_alpha=12.0),
}


@pytest.mark.parametrize("recipe", list(EXPECTED))
def test_mitigation_recipe_reaches_the_model(recipe):
    cfg = compose([f"recipe={recipe}"])
    assert cfg.name == recipe and "recipe" not in cfg
    model_cfg = build_model_config(cfg, vocab_size=512)
    for key, value in EXPECTED[recipe].items():
        assert getattr(model_cfg, key) == value, key
    assert Transformer(model_cfg).llama_compatible()[0] == (recipe in ("ssnorm", "embproj"))
    if recipe == "osp_gated":
        assert cfg.optim.name == "muon"


def test_the_ffn_tail_recipe_turns_on_the_tail_loss_on_top_of_osp():
    from osp.training.module import LanguageModelModule

    osp, tail = compose(["recipe=osp"]), compose(["recipe=osp_ffn_tail"])
    assert tail.name == "osp_ffn_tail" and "recipe" not in tail
    for key in ("model", "optim", "data", "trainer"):
        assert tail[key] == osp[key], key  # the tail loss is the only difference
    module = LanguageModelModule(build_model_config(tail, vocab_size=512), tail.optim, loss=tail.loss)
    assert module.tail_loss is not None
    assert (module.tail_loss.cfg.ffn_tail_weight, module.tail_loss.cfg.ffn_tail_scale) == (1.0, "tensor")
    plain = LanguageModelModule(build_model_config(osp, vocab_size=512), osp.optim, loss=osp.loss)
    assert plain.tail_loss is None
