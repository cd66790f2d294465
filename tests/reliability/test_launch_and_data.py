"""Multi-device runs that Lightning launches itself, and bad training files, through `osp train`."""

from __future__ import annotations

import pytest

from tests.support.cli import error_line, osp, strict_json, train_args

pytestmark = pytest.mark.slow


def test_lightning_launches_two_cpu_devices_from_osp_train(corpus, tmp_path):
    """trainer.devices=2 without torchrun: Lightning re-runs the command for the second device, which must
    train (it once re-ran a rewritten argv and printed the usage text instead)."""
    proc = osp(*train_args(corpus, tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                           "summary=true"), timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = strict_json(tmp_path / "base" / "summary.json")
    assert summary["world_size"] == 2 and summary["status"] == "finished" and summary["steps"] == 5
    assert summary["tokens_seen"] == 5 * 8 * 64 * 2  # steps x batch x seq_len x ranks
    assert summary["train_loss"] is not None


def test_a_binary_training_file_is_one_line_naming_it(corpus, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("Plain words in a plain file. " * 200)
    (data / "photo.txt").write_bytes(bytes(range(256)) * 64)  # NUL bytes: binary
    proc = osp(*train_args(corpus, tmp_path / "runs", f"data.source.paths={data}/*.txt",
                           f"data.cache_dir={tmp_path / 'cache'}"))
    line = error_line(proc)
    assert "photo.txt" in line and "NUL bytes" in line and "data.source.paths" in line
    assert not (tmp_path / "runs" / "base" / "checkpoints").exists()
