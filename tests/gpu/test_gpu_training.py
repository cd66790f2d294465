"""Real training on one CUDA device, through the `osp` command line in subprocesses (the way users run it):
20 bf16-mixed steps of every tiny-scale recipe (each block variant), and FSDP2 on one device with a
SIGTERM preemption and `resume=auto`.

The 1.4B paper recipes (`*_1p4b` and the recipes that start from them: muon, muon_only, ...) are left out:
their tiny-scale counterparts are the block variants below, and tests/bench/test_recipes_1p4b.py covers
their composition.
"""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from osp.checkpoint_files import checkpoint_step, is_distributed_checkpoint
from osp.conf import RECIPE_DIR
from tests.support.cli import REPO
from tests.support.gpu import gpu_env
from tests.support.training import tiny_overrides

pytestmark = pytest.mark.gpu

STEPS = 20
TIMEOUT = 600
GPU_RUN = ["trainer=gpu", f"trainer.max_steps={STEPS}", "trainer.precision=bf16-mixed", "summary=true"]
# FSDP2 on one device; its own precision (32-true + the bf16 param_dtype policy of trainer/fsdp.yaml).
FSDP_RUN = ["trainer=fsdp", "trainer.devices=1", f"trainer.max_steps={STEPS}", "summary=true",
            "trainer.val_check_interval=10", "callbacks.checkpoint.every_n_train_steps=10"]
KILL_STEP = 7  # between the periodic checkpoints: last.ckpt then comes from the preemption handler
# Resumed vs uninterrupted run, per logged step. Not bit-exact on a GPU: bf16 FSDP compute and CUDA kernels
# with atomic accumulation (e.g. the embedding backward) differ in the last bits from run to run. A resume
# that lost the optimizer state or replayed other batches moves the loss far more than this.
LOSS_ATOL = 2e-2


def recipe_parents(name: str) -> list[str]:
    """The recipes a recipe file starts from (the plain names in its defaults list), recursively."""
    spec = yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text()) or {}
    parents = [d for d in spec.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return [p for parent in parents for p in (parent, *recipe_parents(parent))]


def is_1p4b(name: str) -> bool:
    return any(r.endswith("_1p4b") for r in (name, *recipe_parents(name)))


def block_recipes() -> list[str]:
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    return [n for n in names if not is_1p4b(n)]


def osp(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`osp ARGS` (the console script's entry point) in a subprocess from the repo root."""
    return subprocess.run([sys.executable, "-m", "osp", *args], cwd=REPO, env=gpu_env(),
                          capture_output=True, text=True, timeout=timeout)


def failure(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())  # strict JSON: a NaN would be null


def train_losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as handle:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")}


@pytest.mark.parametrize("recipe", block_recipes())
def test_recipe_trains_20_steps_on_one_gpu(corpus, tmp_path, recipe):
    args = tiny_overrides(corpus, tmp_path, f"recipe={recipe}", *GPU_RUN, f"run_name={recipe}")
    proc = osp("train", *args)
    assert proc.returncode == 0, failure(proc)
    summary = read_summary(tmp_path / recipe)
    assert summary["status"] == "finished" and summary["steps"] == STEPS, summary
    assert summary["precision"] == "bf16-mixed"
    assert summary["val_loss"] is not None and math.isfinite(summary["val_loss"]), summary
    print(f"{recipe}: val loss {summary['val_loss']:.4f} after {STEPS} steps "
          f"({summary['wall_seconds']:.1f} s)")


@pytest.fixture(scope="module")
def fsdp_reference(corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp_runs")
    proc = osp("train", *tiny_overrides(corpus, root, *FSDP_RUN, "run_name=reference"))
    assert proc.returncode == 0, failure(proc)
    return root / "reference"


def test_fsdp2_one_device_trains(fsdp_reference):
    summary = read_summary(fsdp_reference)
    assert summary["status"] == "finished" and summary["steps"] == STEPS and summary["world_size"] == 1
    assert summary["val_loss"] is not None and math.isfinite(summary["val_loss"]), summary
    last = fsdp_reference / "checkpoints" / "last.ckpt"
    assert is_distributed_checkpoint(last) and checkpoint_step(last) == STEPS
    assert set(train_losses(fsdp_reference)) == set(range(STEPS))


def test_fsdp2_sigterm_then_resume_auto_matches_uninterrupted(corpus, fsdp_reference):
    """SignalAt sends SIGTERM to the run after step 7; the preemption handler saves a distributed
    checkpoint and exits 143; resume=auto finishes the run. Asserted: the stop (exit code, message, a
    distributed checkpoint from step 7 on), the resumed run finishing all 20 steps with the same token
    count, and its per-step train losses and final val loss equal to the uninterrupted run's within
    LOSS_ATOL."""
    root = fsdp_reference.parent
    args = tiny_overrides(corpus, root, *FSDP_RUN, "run_name=preempted")
    kill = ["+callbacks.kill._target_=tests.support.callbacks.SignalAt", f"+callbacks.kill.step={KILL_STEP}"]
    stopped = osp("train", *args, *kill)
    assert stopped.returncode == 128 + signal.SIGTERM, failure(stopped)
    assert "osp train: stopped by SIGTERM after step" in stopped.stderr, failure(stopped)
    run_dir = root / "preempted"
    last = run_dir / "checkpoints" / "last.ckpt"
    step = checkpoint_step(last)  # the handler saves at the step boundary where it sees the signal
    assert is_distributed_checkpoint(last) and KILL_STEP <= step < STEPS, step
    assert read_summary(run_dir)["status"] == "stopped"

    done = osp("train", *args, "resume=auto")
    assert done.returncode == 0, failure(done)
    assert f"resuming from {last} (step {step})" in done.stdout, failure(done)
    summary, reference = read_summary(run_dir), read_summary(fsdp_reference)
    assert summary["status"] == "finished" and summary["steps"] == STEPS
    assert summary["tokens_seen"] == reference["tokens_seen"]
    got, want = train_losses(run_dir), train_losses(fsdp_reference)
    assert got.keys() == want.keys() == set(range(STEPS))
    worst = max(abs(got[s] - want[s]) for s in want)
    print(f"fsdp resume: max |train loss - uninterrupted| = {worst:.2e}; val loss {summary['val_loss']:.5f} "
          f"vs {reference['val_loss']:.5f}")
    assert worst <= LOSS_ATOL, f"train loss differs by up to {worst:.2e} from the uninterrupted run"
    assert summary["val_loss"] == pytest.approx(reference["val_loss"], abs=LOSS_ATOL)
