"""End of a real (tiny) Lightning run: the Export callback, then `osp export` and load_model on the run
dir."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from osp.cli.export import main as export_main
from osp.conf import compose
from osp.export import export_hf, load_model
from osp.training.callbacks.export import Export
from osp.training.module import LanguageModelModule
from tests.support.export import VOCAB, assert_same_function, make_tokenizer, tiny_config, trained_like

pytestmark = pytest.mark.slow

SEQ = 16
OPTIM = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8,
         "grad_clip": None, "schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 1.0}


class TinyData(L.LightningDataModule):
    """Random blocks (B, SEQ + 1) and the datamodule's tokenizer, as PretrainDataModule offers them."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = make_tokenizer()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randint(0, VOCAB, (16, SEQ + 1), generator=torch.Generator().manual_seed(0)),
                          batch_size=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step run (SSNorm + EmbProj + headwise gates) with checkpointing and the Export callback."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = tiny_config(max_seq_len=SEQ, norm="ss", emb_proj=True, attn_gate="headwise")
    module = LanguageModelModule(cfg, OPTIM)
    export = Export(out_dir=str(run_dir / "export"))
    checkpoint = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, default_root_dir=str(run_dir),
                        logger=False, callbacks=[export, checkpoint], enable_progress_bar=False,
                        enable_model_summary=False)
    datamodule = TinyData()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore",
                                message="You defined a `validation_step` but have no `val_dataloader`")
        trainer.fit(module, datamodule=datamodule)
    datamodule.tokenizer.save_pretrained(str(run_dir / "tokenizer"))  # as osp train does at fit start
    return run_dir, module.model.eval(), export


def test_callback_writes_export_at_train_end(run, input_ids):
    run_dir, model, export = run
    out = run_dir / "export"
    assert export.final_metrics() == {"export_dir": str(out.resolve())}
    assert (out / "tokenizer.json").exists() and (out / "modeling_osp.py").exists()
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert_same_function(model, hf, input_ids[:, :SEQ])


def test_load_model_from_run_dir_reproduces_training_model(run, input_ids):
    run_dir, model, _ = run
    loaded, tokenizer = load_model(run_dir)
    assert tokenizer is not None and loaded.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded(input_ids[:, :SEQ]), model(input_ids[:, :SEQ]))


def test_cli_exports_run_dir_and_refuses_to_overwrite(run, tmp_path, capsys):
    run_dir = run[0]
    out = tmp_path / "cli"
    export_main([str(run_dir), str(out)])
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "osp"
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(run_dir / "checkpoints" / "last.ckpt"), str(out)])
    assert exit_info.value.code == 1 and "not empty" in capsys.readouterr().err
    export_main([str(run_dir / "checkpoints" / "last.ckpt"), str(out), "--force", "--dtype", "bfloat16"])
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_reports_foreign_checkpoint(tmp_path, capsys):
    torch.save({"state_dict": {"encoder.w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "other.ckpt"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "other.ckpt" in err and "no 'model.' keys" in err and not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore::osp.export.LayoutWarning")
def test_cli_prints_layout_warnings(tmp_path, capsys):
    source = export_hf(trained_like(tiny_config(d_model=96, n_kv_heads=4)), tmp_path / "src")  # head_dim 24
    capsys.readouterr()
    export_main([str(source), str(tmp_path / "out"), "--max-shard-size", "20KB"])
    captured = capsys.readouterr()
    assert "warning: osp export: head_dim=24" in captured.err
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_export_callback_config_instantiates():
    cfg = compose(["+callbacks@callbacks.export=export", "run_dir=/tmp/osp-run"])
    callback = instantiate(cfg.callbacks.export)
    assert isinstance(callback, Export)
    assert Path(callback.out_dir) == Path("/tmp/osp-run/export") and callback.force is True


@pytest.mark.distributed
def test_export_callback_gathers_fsdp2_weights(tmp_path, input_ids):
    """2 gloo ranks, FSDP2-sharded (DTensor) parameters: the full state dict is gathered, rank 0 writes."""
    worker = Path(__file__).with_name("fsdp_export_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("osp_export_fsdp_worker", worker)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.make_model().eval()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), trust_remote_code=True).eval()
    assert_same_function(model, hf, input_ids)
