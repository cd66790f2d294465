"""load_model: Lightning checkpoints, run dirs, FSDP2 checkpoint folders and exported folders back into osp,
and clear errors for anything else."""

import json
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from osp.errors import CheckpointError
from osp.export import export_hf, load_model
from osp.model import Transformer
from tests.support.export import tiny_config, trained_like


def lightning_checkpoint(model: Transformer) -> dict:
    """What LanguageModelModule + Lightning write: `model.`-prefixed weights, hyper-parameters, osp extras."""
    return {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": model.cfg.to_dict(), "optim": {"name": "adamw"}, "compile": False},
        "osp": {"tokens_seen": 1234, "model_config": model.cfg.to_dict()},
        "global_step": 3,
    }


def logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def test_checkpoint_file_and_run_dir(tmp_path, tokenizer, input_ids):
    model = trained_like(tiny_config(norm="ss", emb_proj=True, attn_gate="headwise"))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save(lightning_checkpoint(model), run_dir / "checkpoints" / "last.ckpt")
    tokenizer.save_pretrained(str(run_dir / "tokenizer"))

    for source in (run_dir / "checkpoints" / "last.ckpt", run_dir):
        loaded, tok = load_model(source)
        assert loaded.cfg == model.cfg and not loaded.training
        assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))
        assert tok is not None and tok("w3")["input_ids"] == tokenizer("w3")["input_ids"]


def test_checkpoint_without_tokenizer_gives_none(tmp_path):
    torch.save(lightning_checkpoint(trained_like(tiny_config())), tmp_path / "x.ckpt")
    assert load_model(tmp_path / "x.ckpt")[1] is None
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_model(tmp_path / "x.ckpt", tokenizer=tmp_path)


@pytest.mark.filterwarnings("ignore::osp.export.LayoutWarning")
@pytest.mark.parametrize("overrides", [
    dict(), dict(norm="ss", emb_proj=True), dict(tie_embeddings=True),
    dict(attn_softmax="clipped", clip_alpha=2.0, gated_norm_rank=4, norm="ss"),
])
def test_exported_folder_loads_back_with_the_same_function(overrides, tmp_path, tokenizer, input_ids):
    model = trained_like(tiny_config(**overrides))
    out = export_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    loaded, tok = load_model(out)
    # Folded: per-channel RMSNorm, no EmbProj; the same function, so the same metrics.
    assert loaded.cfg.norm == "rms" and not loaded.cfg.emb_proj and loaded.emb_proj_in is None
    for key in ("attn_softmax", "gated_norm_rank", "tie_embeddings"):
        assert getattr(loaded.cfg, key) == getattr(model.cfg, key)
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), rtol=0, atol=1e-5)
    assert tok is not None
    if model.cfg.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_run_dir_without_checkpoints_loads_its_export(tmp_path, tokenizer, input_ids):
    """The paper-table scales keep no checkpoints: their run dir stands for its export."""
    model = trained_like(tiny_config())
    export_hf(model, tmp_path / "run" / "export", tokenizer=tokenizer)
    loaded, tok = load_model(tmp_path / "run")
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), rtol=0, atol=1e-5)
    assert tok is not None


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_folder(tmp_path, input_ids):
    """Lightning's ModelParallelStrategy (FSDP2) writes last.ckpt as a DCP folder plus meta.pt."""
    model = trained_like(tiny_config(pre_affine=True))
    folder = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = lightning_checkpoint(model)
    dcp.save({"state_dict": checkpoint.pop("state_dict")}, checkpoint_id=str(folder), no_dist=True)
    torch.save(checkpoint, folder / "meta.pt")
    loaded, _ = load_model(tmp_path / "run")
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))


# Errors: each names the file and the problem ---------------------------------------------------------------


def test_corrupt_checkpoint_file(tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"\x00 definitely not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="broken.ckpt: cannot be read as a PyTorch checkpoint"):
        load_model(path)


def test_truncated_checkpoint_file(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save(lightning_checkpoint(trained_like(tiny_config())), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.ckpt: cannot be read"):
        load_model(path)


@pytest.mark.parametrize("payload, message", [
    ({"weights": 1}, "not a Lightning checkpoint"),
    ({"state_dict": {"encoder.weight": torch.zeros(2)}, "hyper_parameters": {"model": {"d_model": 64}}},
     r"no 'model\.' keys \(found encoder\.weight\)"),
    ({"state_dict": {"model.x": torch.zeros(2)}}, "no model config"),
    ({"state_dict": {"model.x": torch.zeros(2)}, "hyper_parameters": {"model": {"d_modle": 64}}},
     "bad model config.*model.d_modle is not a model setting"),
])
def test_foreign_checkpoints(payload, message, tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f"foreign.ckpt: .*{message}"):
        load_model(path)


def test_checkpoint_that_does_not_fit_its_config(tmp_path):
    model = trained_like(tiny_config())
    checkpoint = lightning_checkpoint(model)
    checkpoint["osp"]["model_config"]["ffn_hidden"] = 256
    del checkpoint["state_dict"]["model.norm.weight"]
    torch.save(checkpoint, tmp_path / "x.ckpt")
    message = (r"x.ckpt: weights do not match .*missing norm.weight.*"
               r"shape mismatch layers.0.mlp.gate_proj.weight: checkpoint \(192, 64\) vs model \(256, 64\)")
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "x.ckpt")


def test_folder_without_config_or_checkpoint(tmp_path):
    with pytest.raises(CheckpointError,
                       match="not a checkpoint, a run dir with checkpoints/.*no config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")


@pytest.fixture
def exported(tmp_path):
    return export_hf(trained_like(tiny_config()), tmp_path / "hf")


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_foreign_model_type(exported):
    edit_config(exported, model_type="gpt2")
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'gpt2' is neither 'llama' nor 'osp'"):
        load_model(exported)


def test_unsupported_llama_variant(exported):
    edit_config(exported, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    with pytest.raises(CheckpointError, match="rope_type='llama3' is not supported"):
        load_model(exported)


def test_config_shape_mismatch(exported):
    edit_config(exported, intermediate_size=256)
    with pytest.raises(CheckpointError,
                       match="config.json: weights do not match.*shape mismatch layers.0.mlp"):
        load_model(exported)


def test_bad_json_and_missing_weights(exported):
    (exported / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot be read as safetensors"):
        load_model(exported)
    (exported / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(exported)
    (exported / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot be read as JSON"):
        load_model(exported)


def test_missing_config_key(exported):
    config = json.loads((exported / "config.json").read_text())
    del config["hidden_size"]
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: missing key 'hidden_size'"):
        load_model(exported)
    shutil.rmtree(exported)
