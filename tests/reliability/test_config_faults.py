"""Typos on the command line fail in one line before the Trainer is built (no run folder is created);
what Lightning itself refuses, and a mistyped `osp eval --quant`, are one line too."""

from __future__ import annotations

import pytest
import torch

from osp.cli.train import main
from tests.support.cli import error_line, osp, train_args

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("override, words", [
    ("model.d_model=abc", ["model.d_model must be an integer", "'abc'"]),
    ("model.n_layers=[1,2]", ["model.n_layers must be an integer", "[1, 2]"]),
    ("trainer.precision=17-foo", ["trainer.precision='17-foo' is not a precision", "32-true", "bf16-mixed"]),
    ("trainer=gpu", ["trainer.accelerator=gpu", "no usable CUDA GPU", "trainer=cpu"]),
    ("model.max_seq_len=32", ["data.seq_len=64 exceeds model.max_seq_len=32", "lower data.seq_len"]),
    ("model.d_modle=64", ["model.d_modle is not a setting (did you mean model.d_model?"]),
    ("trainer.accumulate_grad_batches=0", ["trainer.accumulate_grad_batches must be a positive number"]),
    ("trainer.val_check_interval=0", ["trainer.val_check_interval must be a positive number"]),
])
def test_config_typo_fails_before_the_trainer_is_built(corpus, tmp_path, monkeypatch, override, words):
    """In-process (`osp train`'s checks before Hydra starts: a second each); the subprocess test below
    shows the same line reaches the terminal without a traceback."""
    if override == "trainer=gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: trainer=gpu is valid here")
    monkeypatch.setenv("OSP_RUN_ID", "typo")  # main() pins it for its process; restored afterwards
    with pytest.raises(SystemExit) as stop:
        main(train_args(corpus, tmp_path / "runs", override)[1:])
    line = str(stop.value.code)
    assert line.startswith("osp train: error: ") and "\n" not in line
    for word in words:
        assert word in line, line
    assert not (tmp_path / "runs").exists()  # no empty run folder left behind


def test_config_typo_is_one_line_on_the_terminal(corpus, tmp_path):
    proc = osp(*train_args(corpus, tmp_path / "runs", "model.d_model=abc"))
    line = error_line(proc)
    assert proc.returncode == 1 and line == "osp train: error: model.d_model must be an integer, got 'abc'"
    assert "GPU available:" not in proc.stderr  # Lightning prints it when a Trainer is built
    assert not (tmp_path / "runs").exists()


def test_lightning_misconfiguration_is_one_line(corpus, tmp_path):
    """A Trainer argument that only Lightning checks (MisconfigurationException)."""
    proc = osp(*train_args(corpus, tmp_path / "runs", "trainer.limit_val_batches=-1"))
    line = error_line(proc)
    assert proc.returncode == 1
    assert "invalid value -1 for limit_val_batches" in line and "trainer.* settings" in line
    assert not (tmp_path / "runs" / "base" / "checkpoints").exists()


def test_eval_quant_typo_lists_the_valid_presets(trained):
    proc = osp("eval", str(trained), "--quant", "w4q4")
    line = error_line(proc, "osp eval: error: ")
    assert proc.returncode == 2
    assert "unknown quant preset 'w4q4'" in line and "w<bits>a<bits>[kv<bits>][+smooth][+had][+gptq]" in line
    assert "'w4a4kv4'" in line and "'w4a16'" in line
    assert "perplexity" not in proc.stdout  # refused before any evaluation
