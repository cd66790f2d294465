"""Signals: Ctrl-C (SIGINT) saves and stops like a preemption and the run continues; summary.json is
strict JSON with a status; launch/torchrun.sh passes SIGTERM / SIGUSR1 on and exits 143 / 138.
(SIGTERM to `osp train` itself: tests/training/test_preemption.py.)"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest

from osp.checkpoint_files import checkpoint_step
from tests.support.cli import REPO, osp, strict_json
from tests.support.training import subprocess_env, tiny_overrides

pytestmark = pytest.mark.slow


def test_summary_of_a_finished_run_is_strict_json_with_its_status(trained):
    summary = strict_json(trained / "summary.json")
    assert summary["status"] == "finished" and summary["steps"] == summary["max_steps"] == 5
    assert summary["checkpoint"] == str((trained / "checkpoints" / "last.ckpt").resolve())


def test_sigint_saves_a_checkpoint_and_resume_auto_finishes(corpus, tmp_path):
    args = ["train", *tiny_overrides(corpus, tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=3",
                                     "run_name=ctrl-c", "~callbacks.export")]
    stopped = osp(*args, "+callbacks.kill._target_=tests.support.callbacks.SignalAt",
                  "+callbacks.kill.step=3", "+callbacks.kill.signal_name=SIGINT")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr + stopped.stdout and "KeyboardInterrupt" not in stopped.stderr
    line = stopped.stderr.strip().splitlines()[-1]
    last = tmp_path / "ctrl-c" / "checkpoints" / "last.ckpt"
    step = checkpoint_step(last)
    assert line.startswith(f"osp train: stopped by SIGINT after step {step}; checkpoint saved to {last}")
    assert "run_name=ctrl-c resume=auto" in line
    summary = strict_json(tmp_path / "ctrl-c" / "summary.json")
    assert summary["status"] == "stopped" and summary["steps"] == step and 3 <= step < 6

    done = osp(*args, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {last} (step {step})" in done.stdout
    summary = strict_json(tmp_path / "ctrl-c" / "summary.json")
    assert summary["status"] == "finished" and summary["steps"] == 6 and summary["tokens_seen"] == 6 * 8 * 64


def _torchrun_available() -> bool:
    return shutil.which("bash") is not None and (REPO / "launch" / "torchrun.sh").is_file()


@pytest.mark.skipif(not _torchrun_available(), reason="needs bash and launch/torchrun.sh")
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_torchrun_sh_passes_the_signal_on_and_exits_128_plus_it(corpus, tmp_path, signame):
    args = tiny_overrides(corpus, tmp_path, "trainer.max_steps=200", "trainer.val_check_interval=100",
                          "callbacks.checkpoint.every_n_train_steps=2", "trainer.precision=32-true",
                          "~callbacks.export", "+callbacks.slow._target_=tests.support.callbacks.SlowSteps")
    env = subprocess_env(NGPU="1", TRAINER="ddp", RUN_NAME="launched",
                         TORCHRUN=f"{sys.executable} -m torch.distributed.run")
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "torchrun.sh"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "launched" / "checkpoints" / "step0000002.ckpt"
    deadline = time.monotonic() + 120
    while not first.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.1)
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=120)
    expected = 128 + getattr(signal, signame)
    assert proc.returncode == expected, err[-3000:]
    assert "Traceback" not in out + err, err[-5000:]
    assert f"osp train: stopped by {signame} after step" in err
    assert checkpoint_step(tmp_path / "launched" / "checkpoints" / "last.ckpt") >= 2


@pytest.mark.skipif(not _torchrun_available(), reason="needs bash and launch/torchrun.sh")
def test_a_killed_ddp_rank_is_one_line_per_process_naming_the_rank_and_the_resume(corpus, tmp_path):
    """kill -9 of rank 1 after step 2: the surviving rank and the launcher each say it in one line (no gloo
    error, no ChildFailedError traceback), and the run resumes from its checkpoint."""
    args = tiny_overrides(corpus, tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=6",
                          "callbacks.checkpoint.every_n_train_steps=2", "~callbacks.export",
                          "+callbacks.kill._target_=tests.support.callbacks.SignalAt",
                          "+callbacks.kill.step=3", "+callbacks.kill.rank=1",
                          "+callbacks.kill.signal_name=SIGKILL")
    env = subprocess_env(NGPU="2", TRAINER="ddp", RUN_NAME="killed",
                         TORCHRUN=f"{sys.executable} -m torch.distributed.run")
    proc = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-5000:]
    assert "osp launch: rank 1 died (Signal 9 (SIGKILL)" in proc.stderr and "RUN_NAME=killed" in proc.stderr
    assert "rank 0 of 2 lost contact with another rank" in proc.stderr and "resume=auto" in proc.stderr
    assert checkpoint_step(tmp_path / "killed" / "checkpoints" / "step0000002.ckpt") == 2
