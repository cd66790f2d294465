"""Plain-Llama export: folders that transformers loads as LlamaForCausalLM, computing what osp computes."""

import json
import re
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from osp.export import LayoutWarning, export_hf, layout_problems
from osp.export.layout import HADAMARD_K, hadamard_k
from tests.support.export import assert_same_function, tiny_config, trained_like


def load_hf(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_llama_round_trip_matches_transformers(tmp_path, tokenizer, input_ids):
    model = trained_like(tiny_config())
    out = export_hf(model, tmp_path / "hf", tokenizer=tokenizer)

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.endswith(".py") for name in names)  # no custom code on the Llama path
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False and config["eos_token_id"] == tokenizer.eos_token_id
    assert config["osp"]["trained_config"] == model.cfg.to_dict()
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["model_max_length"] == model.cfg.max_seq_len == config["max_position_embeddings"]

    hf = load_hf(out)
    assert type(hf) is LlamaForCausalLM
    assert_same_function(model, hf, input_ids)
    assert AutoTokenizer.from_pretrained(str(out))("w1 w2")["input_ids"] == tokenizer("w1 w2")["input_ids"]


def test_ssnorm_and_emb_proj_fold_into_plain_llama(tmp_path, input_ids):
    model = trained_like(tiny_config(norm="ss", emb_proj=True))
    out = export_hf(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is False
    assert len(config["osp"]["folded"]) == 2

    hf = load_hf(out)
    assert not any("emb_proj" in name for name, _ in hf.named_parameters())
    # Every norm is a vector filled with the trained scalar.
    gain = model.layers[1].post_attention_layernorm.weight.item()
    assert torch.equal(hf.model.layers[1].post_attention_layernorm.weight, torch.full((64,), gain))
    assert_same_function(model, hf, input_ids)


def test_tied_model_stays_tied(tmp_path, input_ids):
    model = trained_like(tiny_config(tie_embeddings=True))
    with pytest.warns(LayoutWarning, match="tied embeddings"):
        out = export_hf(model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    hf = load_hf(out)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert_same_function(model, hf, input_ids)


def test_large_weights_are_sharded_with_an_index(tmp_path, input_ids):
    model = trained_like(tiny_config())
    out = export_hf(model, tmp_path / "hf", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()
    assert_same_function(model, load_hf(out), input_ids)


def test_tokenizer_given_as_a_folder(tmp_path, tokenizer):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    out = export_hf(trained_like(tiny_config()), tmp_path / "hf", tokenizer=tmp_path / "tok")
    assert AutoTokenizer.from_pretrained(str(out)).eos_token == "<eos>"
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        export_hf(trained_like(tiny_config()), tmp_path / "hf2", tokenizer=tmp_path / "nowhere")


def test_dtype_cast(tmp_path):
    out = export_hf(trained_like(tiny_config()), tmp_path / "hf", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_hf(out).model.embed_tokens.weight.dtype == torch.bfloat16


def test_tokenizer_larger_than_vocab_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="vocab_size is 50"):
        export_hf(trained_like(tiny_config(vocab_size=50)), tmp_path / "hf", tokenizer=tokenizer)
    assert not (tmp_path / "hf").exists()


def test_an_earlier_export_is_replaced_only_when_forced(tmp_path):
    target = tmp_path / "hf"
    model = trained_like(tiny_config())
    export_hf(model, target)
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(model, target)
    export_hf(model, target, force=True)
    assert (target / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary or old folder left behind


@pytest.mark.parametrize("precious", ["keep.txt", "checkpoints", "summary.json", ".hydra"])
def test_force_never_replaces_what_is_not_an_export(tmp_path, precious):
    """A run dir, a folder holding the source run, any user folder: refused even with --force."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text("{}")  # looks half like an export
    keep = target / precious
    if "." in precious and precious != ".hydra":
        keep.write_text("precious")
    else:
        keep.mkdir()
        (keep / "last.ckpt").write_text("precious")
    model = trained_like(tiny_config())
    with pytest.raises(FileExistsError, match=rf"not an export \({re.escape(precious)}\).*even with --force"):
        export_hf(model, target, force=True)
    assert sorted(p.name for p in target.iterdir()) == sorted(["config.json", precious])
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


def test_failed_export_leaves_target_untouched(tmp_path, monkeypatch):
    target = tmp_path / "hf"
    model = trained_like(tiny_config())
    export_hf(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("osp.export.hf.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, target, force=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_empty_existing_directory_is_accepted(tmp_path):
    (tmp_path / "hf").mkdir()
    assert (export_hf(trained_like(tiny_config()), tmp_path / "hf") / "config.json").exists()


@pytest.mark.parametrize("n, quarot, spinquant", [
    (4096, 1, 1), (5504, 172, 172), (11008, 172, 172), (14336, 28, 28), (480, 60, 60),
    (704, None, 44), (2368, 148, None), (200, None, None), (516, None, None),  # 516 = 172 * 3
])
def test_hadamard_k_follows_the_tools_search_order(n, quarot, spinquant):
    assert hadamard_k(n, HADAMARD_K["QuaRot"]) == quarot
    assert hadamard_k(n, HADAMARD_K["SpinQuant"]) == spinquant


def test_layout_warnings(tmp_path):
    assert layout_problems(tiny_config()) == []  # head_dim 16, ffn 192 = 12 * 16, d 64, 4 heads
    cfg = tiny_config(d_model=96, n_heads=4, n_kv_heads=4, ffn_hidden=200)  # head_dim 24, ffn 200 = 8 * 25
    problems = layout_problems(cfg)
    assert any("head_dim=24" in p for p in problems)
    ffn = "intermediate_size (model.ffn_hidden)=200"
    assert any(ffn in p and "QuaRot and SpinQuant" in p for p in problems)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_hf(trained_like(cfg), tmp_path / "hf")
    messages = [str(w.message) for w in caught if issubclass(w.category, LayoutWarning)]
    assert len(messages) == len(problems) and "head_dim=24" in messages[0]
    assert (out / "config.json").exists()  # a warning, not an error: transformers loads it fine


@pytest.mark.parametrize("overrides", [dict(), dict(attn_gate="headwise")])
def test_weights_unknown_to_the_target_class_are_refused(overrides, tmp_path):
    """A parameter the export does not know (a new block) must not become a silently re-initialised weight."""
    model = trained_like(tiny_config(**overrides))
    model.layers[0].mlp.register_parameter("new_scale", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(RuntimeError, match=r"unknown to it \['model.layers.0.mlp.new_scale'\]"):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_exported_files_get_the_usual_modes_under_the_umask(tmp_path, tokenizer):
    """safetensors writes its file 0600: a server running as another user could not read the export."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        out = export_hf(trained_like(tiny_config()), tmp_path / "export", tokenizer=tokenizer)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes["model.safetensors"] == 0o644 and modes["config.json"] == 0o644 and modes["export"] == 0o755
