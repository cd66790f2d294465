"""A tiny end-to-end `osp train` through the real CLI, in a subprocess."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.support.synthetic_text import write_corpus
from tests.support.training import TINY_MODEL_DATA

pytestmark = pytest.mark.slow

# The shared tiny model and data, with the default callbacks and a longer run (60 steps, two validations).
TINY = [
    *TINY_MODEL_DATA, "optim.lr=3e-3", "optim.warmup_steps=5", "trainer.max_steps=60",
    "trainer.val_check_interval=30", "trainer.precision=32-true", "logger=none",
    "callbacks.checkpoint.every_n_train_steps=30",
]


def run_osp(args, tmp_path, check=True):
    env = dict(os.environ, OSP_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "osp", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"osp {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny `osp train` run with the default callbacks (metrics, W4A4 eval, export)."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    corpus = write_corpus(tmp_path / "corpus")
    proc = run_osp(["train", *TINY, f"data.source.paths={corpus}", f"runs_root={tmp_path}/runs",
                    "run_name=e2e"], tmp_path)
    return tmp_path, tmp_path / "runs" / "e2e", proc


def test_osp_train_end_to_end(trained):
    tmp_path, run_dir, proc = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "osp summary" in proc.stdout and "W4A4 ppl" in proc.stdout and "kurtosis" in proc.stdout
    assert summary["steps"] == 60
    assert summary["tokens_seen"] == 60 * 8 * 64
    # The synthetic grammar is very predictable: loss must fall far below the uniform ln(vocab).
    assert summary["val_loss"] < math.log(384) - 3.0
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "tokenizer" / "tokenizer.json").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert "train/loss" in (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert (run_dir / "export" / "config.json").exists() and summary["export_dir"]
    assert summary["kurtosis"] >= 0 and summary["ppl_w4a4"] >= summary["ppl_fp"] * 0.9
    # train.log holds what the run printed (the start line and the summary), not only Hydra's log records.
    log = (run_dir / "train.log").read_text()
    assert "osp: run e2e" in log and "osp summary" in log and "W4A4 ppl" in log and "\r" not in log


def test_eval_of_the_export_equals_the_last_in_training_values(trained):
    tmp_path, run_dir, _ = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    out = tmp_path / "eval.json"
    run_osp(["eval", str(run_dir / "export"), "--json", str(out)], tmp_path)
    result = json.loads(out.read_text())
    assert result["quant"]["ppl_fp"] == pytest.approx(summary["ppl_fp"], rel=1e-5)
    assert result["quant"]["ppl_quant"] == pytest.approx(summary["ppl_w4a4"], rel=1e-5)
    assert result["kurtosis_context"]["mean"] == pytest.approx(summary["kurtosis"], rel=1e-5)
    assert result["kurtosis_osp_exact"]["mean"] == pytest.approx(summary["kurtosis_exact"], rel=1e-5)


def test_report_compares_runs(trained):
    tmp_path, run_dir, _ = trained
    proc = run_osp(["report", str(run_dir), str(run_dir), "--out", str(tmp_path / "report")], tmp_path)
    assert "kurt" in proc.stdout and (tmp_path / "report" / "kurtosis_mean.png").exists()


def test_cfg_job_prints_the_resolved_config(tmp_path):
    proc = run_osp(["train", "--cfg", "job", "model.n_layers=3"], tmp_path)
    assert "n_layers: 3" in proc.stdout and "optim:" in proc.stdout


def test_config_errors_are_one_clear_line(tmp_path):
    proc = run_osp(["train", "model.norm=layer", f"runs_root={tmp_path}/runs"], tmp_path, check=False)
    assert proc.returncode == 1
    assert "osp train: error: model.norm='layer' is not allowed; choose one of ['rms', 'ss']" in proc.stderr
    proc = run_osp(["train", "optim=sgd"], tmp_path, check=False)
    assert proc.returncode != 0 and "Could not find 'optim/sgd'" in proc.stderr and "adamw" in proc.stderr


def test_missing_data_is_a_clear_error(tmp_path):
    proc = run_osp(["train", *TINY, f"data.source.paths={tmp_path}/nothing/*.txt",
                    f"runs_root={tmp_path}/runs"], tmp_path, check=False)
    assert proc.returncode == 1
    assert "osp train: error:" in proc.stderr and "nothing" in proc.stderr


def test_busy_cores_are_noticed_once_with_what_to_do():
    from osp.training.run import busy_cores_notice

    line = busy_cores_notice(load=3.0, cores=2, threads=2)
    assert "load 3.0 on 2 cores" in line and "2 threads" in line and "OMP_NUM_THREADS=1" in line
    assert busy_cores_notice(load=0.3, cores=2, threads=2) is None  # an idle machine
    assert busy_cores_notice(load=4.0, cores=16, threads=8) is None  # enough free cores
    assert "OMP_NUM_THREADS=2" in busy_cores_notice(load=2.0, cores=4, threads=4)
