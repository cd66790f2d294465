"""Preemption: a real SIGTERM to `osp train` leaves a usable checkpoint; resume=auto finishes the run.
Under SLURM, a SIGUSR1 checkpoint is followed by `scontrol requeue`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from osp.checkpoint_files import checkpoint_step
from osp.conf import compose
from osp.export import load_model
from osp.training.preemption import Preempted
from osp.training.run import train
from tests.support.cli import REPO
from tests.support.training import subprocess_env, tiny_overrides

pytestmark = pytest.mark.slow

STEPS = 30


def osp_train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "osp", "train", *args], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            err = proc.communicate()[1]
            raise AssertionError(f"osp train ended early ({proc.returncode}):\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.1)


def test_sigterm_saves_a_checkpoint_and_resume_auto_finishes(corpus, tmp_path):
    args = tiny_overrides(corpus, tmp_path, f"trainer.max_steps={STEPS}", "trainer.val_check_interval=10",
                          "callbacks.checkpoint.every_n_train_steps=2", "run_name=preempted")
    run_dir = tmp_path / "preempted"
    proc = osp_train([*args, "+callbacks.slow._target_=tests.support.callbacks.SlowSteps"])
    wait_for(run_dir / "checkpoints" / "step0000002.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "osp train: stopped by SIGTERM after step" in err and "run_name=preempted resume=auto" in err
    assert "Traceback" not in err
    last = run_dir / "checkpoints" / "last.ckpt"
    step = checkpoint_step(last)
    assert 2 <= step < STEPS
    stopped = json.loads((run_dir / "summary.json").read_text())  # strict JSON: no NaN
    assert stopped["status"] == "stopped" and stopped["steps"] == step and stopped["checkpoint"] == str(last)
    assert not (run_dir / "export").exists()
    model, tokenizer = load_model(run_dir)  # usable as it is: osp eval / osp export read it
    assert tokenizer is not None and model.cfg.d_model == 64

    done = subprocess.run([sys.executable, "-m", "osp", "train", *args, "resume=auto"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {last} (step {step})" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["steps"] == STEPS and summary["tokens_seen"] == STEPS * 8 * 64


def test_sigusr1_under_slurm_requeues_the_job(corpus, tmp_path, monkeypatch, one_thread):
    """SLURM's time-limit warning (SIGUSR1): checkpoint first, then `scontrol requeue <job>`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = compose(tiny_overrides(corpus, tmp_path, "trainer.max_steps=8", "~callbacks.export",
                                       "+callbacks.kill._target_=tests.support.callbacks.SignalAt",
                                       "+callbacks.kill.step=2", "+callbacks.kill.signal_name=SIGUSR1"))
    assert cfg.run_name == "tiny-slurm4242"  # a requeued job (same id) finds its run again
    with pytest.raises(Preempted) as stopped:
        train(cfg)
    assert stopped.value.signum == signal.SIGUSR1 and stopped.value.exit_code == 138
    assert checkpoint_step(tmp_path / "tiny-slurm4242" / "checkpoints" / "last.ckpt") == stopped.value.step
    assert calls.read_text().split() == ["requeue", "4242"]
