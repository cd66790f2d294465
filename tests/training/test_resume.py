"""Exact resume: a run stopped at step k and resumed from its checkpoint ends as the uninterrupted run.

In-process runs of the real `train()` on generated text, with Muon (momentum buffers), a cosine schedule,
the data position, and the stateful callbacks (OutlierMonitor, QuantEval, StabilityGuard) all in play.
Same process, same thread count, CPU: parameters and the logged loss curve must be bitwise equal.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from osp.checkpoint_files import checkpoint_step, latest_checkpoint
from osp.conf import compose
from osp.training.preemption import Preempted
from osp.training.run import train
from tests.support.synthetic_text import synthetic_documents
from tests.support.training import TINY, tiny_overrides

pytestmark = pytest.mark.slow

STEPS = 12
SETTINGS = [
    "optim=muon", "optim.lr=3e-3", "optim.warmup_steps=3", f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=6", "callbacks.checkpoint.every_n_train_steps=4",
    "callbacks.outliers.every_n_steps=4", "callbacks.quant_eval.every_n_steps=6", "~callbacks.export",
    "callbacks.stability.spike_factor=1.01",  # fires on small bumps, so the restored running mean matters
]
COMPARED = ("steps", "tokens_seen", "train_loss", "val_loss", "kurtosis", "max_abs", "ppl_w4a4",
            "quant_ratio", "loss_spikes", "skipped_steps", "outliers_step")


def run(corpus, root: Path, name: str, *extra: str) -> dict:
    return train(compose(tiny_overrides(corpus, root, *SETTINGS, f"run_name={name}", *extra)))


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def curve(run_dir: Path, key: str) -> dict[int, str]:
    """step -> value of one logged metric, exactly as written (strings: no float round trip)."""
    with (run_dir / "csv" / "metrics.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(key)]
    steps = [int(row["step"]) for row in rows]
    assert len(steps) == len(set(steps)), f"{key}: duplicate rows at steps {steps}"
    return {int(row["step"]): row[key] for row in rows}


def assert_same_run(got: Path, expected: Path, summary: dict, expected_summary: dict) -> None:
    ref = weights(expected / "checkpoints" / "last.ckpt")
    mine = weights(got / "checkpoints" / "last.ckpt")
    assert mine.keys() == ref.keys()
    for key in ref:
        assert torch.equal(mine[key], ref[key]), key
    for key in ("train/loss", "val/loss", "outliers/kurtosis_mean", "quant/ppl_w4a4", "lr-Muon/matrix"):
        assert curve(got, key) == curve(expected, key), key
    assert {k: summary.get(k) for k in COMPARED} == {k: expected_summary.get(k) for k in COMPARED}


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_runs")
    torch.set_num_threads(1)
    return root, run(corpus, root, "full")


def test_preempted_run_resumes_exactly(corpus, uninterrupted, one_thread):
    root, full = uninterrupted
    # SIGTERM to this very process after step 5: saved at the step boundary, then Preempted.
    with pytest.raises(Preempted) as stopped:
        run(corpus, root, "cut", "+callbacks.kill._target_=tests.support.callbacks.SignalAt",
            "+callbacks.kill.step=5")
    # The signal lands after Preemption looked at step 5 (callback order), so step 6 is the one saved.
    assert stopped.value.step == 6 and stopped.value.exit_code == 143
    last = root / "cut" / "checkpoints" / "last.ckpt"
    assert last.is_file() and checkpoint_step(last) == 6
    assert not list((root / "cut" / "checkpoints").glob("*.tmp"))

    resumed = run(corpus, root, "cut", "resume=auto")
    assert_same_run(root / "cut", root / "full", resumed, full)


def test_a_run_at_the_auto_precision_resumes_exactly(corpus, tmp_path, one_thread, auto_precision):
    """trainer.precision and optim.ns_dtype left at `auto`, resolved both ways (bf16 autocast with bf16
    Newton-Schulz, and fp32): a preempted run resumes bitwise either way, and records what auto became."""
    full = run(corpus, tmp_path, "full", "trainer.precision=auto")
    assert full["precision"] == {"bf16": "bf16-mixed", "fp32": "32-true"}[auto_precision]
    with pytest.raises(Preempted):
        run(corpus, tmp_path, "cut", "trainer.precision=auto", "+callbacks.kill.step=5",
            "+callbacks.kill._target_=tests.support.callbacks.SignalAt")
    resumed = run(corpus, tmp_path, "cut", "trainer.precision=auto", "resume=auto")
    assert_same_run(tmp_path / "cut", tmp_path / "full", resumed, full)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the copy still names the original folder
def test_crash_resumes_from_the_newest_step_checkpoint(corpus, uninterrupted, one_thread):
    """A run killed without warning after step 10: resume=auto takes the step-8 checkpoint and redoes 9-10."""
    root, full = uninterrupted
    crashed = root / "crashed"
    shutil.copytree(root / "full", crashed)
    for name in ("last.ckpt", f"step{STEPS:07d}.ckpt"):
        (crashed / "checkpoints" / name).unlink()
    (crashed / "checkpoints" / "step0000004.ckpt").write_bytes(b"truncated by the crash")
    with pytest.warns(UserWarning, match="skipping .*step0000004.ckpt"):
        assert checkpoint_step(latest_checkpoint(crashed / "checkpoints")) == 8
        resumed = run(corpus, root, "crashed", "resume=auto")
    assert_same_run(crashed, root / "full", resumed, full)


def _hub_overrides(root: Path, data_files: str, name: str, *extra: str) -> list[str]:
    """TINY on a streamed source: datasets' json builder over a local file (the hub code path, offline)."""
    tiny = [o for o in TINY if not o.startswith(("data=", "data.source."))]
    return [*tiny, "data=hub", "data.source.name=json", "data.source.config_name=null",
            f"data.source.data_files={data_files}", "data.source.val_docs=12", "data.num_workers=0",
            "data.pin_memory=false", "data.tokenizer_train_chars=null", f"data.cache_dir={root / 'cache'}",
            "optim=muon", "trainer.max_steps=8", "trainer.val_check_interval=4",
            "callbacks.checkpoint.every_n_train_steps=4", "callbacks.outliers.every_n_steps=4",
            "callbacks.quant_eval.every_n_steps=4", "~callbacks.export", f"runs_root={root}",
            f"run_name={name}", *extra]


def test_a_streamed_run_resumes_at_exactly_the_next_batch(tmp_path, one_thread):
    """data=hub end to end (offline, a local jsonl through the streaming code): a run preempted mid-stream and
    resumed ends bitwise as the uninterrupted one, so the stream continued at exactly the next document."""
    data_files = tmp_path / "web.jsonl"
    data_files.write_text("".join(json.dumps({"text": doc}) + "\n"
                                  for doc in synthetic_documents(150, seed=3)))
    full = train(compose(_hub_overrides(tmp_path, str(data_files), "full")))
    assert full["steps"] == 8
    with pytest.raises(Preempted) as stopped:
        train(compose(_hub_overrides(tmp_path, str(data_files), "cut", "+callbacks.kill.step=3",
                                     "+callbacks.kill._target_=tests.support.callbacks.SignalAt")))
    assert stopped.value.step == 4
    resumed = train(compose(_hub_overrides(tmp_path, str(data_files), "cut", "resume=auto")))
    assert_same_run(tmp_path / "cut", tmp_path / "full", resumed, full)
