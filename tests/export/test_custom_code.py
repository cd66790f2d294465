"""Custom-code export: blocks that do not fold into Llama ship modeling_osp.py; transformers loads the folder
with trust_remote_code=True and computes what osp computes."""

import ast
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from osp.export import export_hf
from osp.export.hf import CUSTOM_CODE_FILES, MODELING_DIR
from tests.support.export import assert_same_function, tiny_config, trained_like

# Every block that does not fold, alone, plus combinations with the foldable ones (which are still folded).
NON_FOLDING = {
    "clipped_gamma_zeta": dict(attn_softmax="clipped", clip_gamma=-0.03, clip_zeta=1.03),
    "clipped_alpha": dict(attn_softmax="clipped", clip_alpha=2.0),
    "head_slice": dict(attn_gate="head_slice"),
    "head_slice_mlp": dict(attn_gate="head_slice", gate_hidden=8),
    "headwise": dict(attn_gate="headwise"),
    "elementwise": dict(attn_gate="elementwise"),
    "gated_norm": dict(gated_norm_rank=4),
    "pre_affine": dict(pre_affine=True),
    "everything": dict(norm="ss", emb_proj=True, attn_gate="elementwise", attn_softmax="clipped",
                       clip_alpha=2.0, gated_norm_rank=4, pre_affine=True),
    "tied_gated_norm": dict(tie_embeddings=True, gated_norm_rank=4, norm="ss"),
}


def load_remote(path):
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


@pytest.mark.parametrize("name", list(NON_FOLDING))
def test_non_folding_block_matches_through_remote_code(name, tmp_path, input_ids):
    model = trained_like(tiny_config(**NON_FOLDING[name]))
    assert model.llama_compatible()[0] is False
    out = export_hf(model, tmp_path / "hf")

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "osp" and config["architectures"] == ["OspForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_osp.OspForCausalLM"
    assert config["osp"]["not_llama"]  # names the blocks that forced custom code
    for name_ in CUSTOM_CODE_FILES:
        assert (out / name_).read_text() == (MODELING_DIR / name_).read_text()
    hf = load_remote(out)
    assert type(hf).__name__ == "OspForCausalLM"
    assert not any("emb_proj" in n for n, _ in hf.named_parameters())  # EmbProj still merged
    assert_same_function(model, hf, input_ids)


def test_clipped_gamma_is_resolved_from_alpha(tmp_path):
    cfg = tiny_config(attn_softmax="clipped", clip_alpha=2.0)
    config = json.loads((export_hf(trained_like(cfg), tmp_path / "hf") / "config.json").read_text())
    assert config["clip_gamma"] == pytest.approx(-2.0 / cfg.max_seq_len)
    assert config["attn_softmax"] == "clipped" and config["clip_zeta"] == 1.0


def test_generate_with_cache_and_left_padding_matches_osp_greedy(tmp_path):
    model = trained_like(tiny_config(attn_softmax="clipped", clip_gamma=-0.02, attn_gate="headwise"))
    hf = load_remote(export_hf(model, tmp_path / "hf"))
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(3))

    def osp_greedy(prompt, n):
        with torch.no_grad():
            for _ in range(n):
                prompt = torch.cat([prompt, model(prompt)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return prompt

    generated = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, osp_greedy(ids, 6))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is a 5-token prompt, left-padded
    padded = hf.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(padded[1, 8:], osp_greedy(ids[1:, 3:], 4)[0, 5:])


def test_labels_give_the_training_loss(tmp_path, input_ids):
    model = trained_like(tiny_config(pre_affine=True))
    hf = load_remote(export_hf(model, tmp_path / "hf"))
    with torch.no_grad():
        logits = model(input_ids)[:, :-1].flatten(0, 1)
        expected = torch.nn.functional.cross_entropy(logits, input_ids[:, 1:].flatten())
        assert torch.allclose(hf(input_ids, labels=input_ids).loss, expected, atol=1e-5)


def test_modeling_code_is_standalone():
    """Users load the folder without osp installed: the code may import only torch, transformers and
    itself."""
    for name in CUSTOM_CODE_FILES:
        tree = ast.parse((MODELING_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"." if node.level else node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"math", "torch", "transformers", "."}, (name, roots)
