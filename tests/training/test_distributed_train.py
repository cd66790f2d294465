"""2-rank gloo training through torchrun (DDP and FSDP2) against a 1-process run with the same global batch.

Ranks run `python -m osp train` under `python -m torch.distributed.run` (never Lightning's `ddp` launcher
inside pytest). The 1-process reference trains on batch B = 8; the 2-rank runs on B/2 = 4 per rank, so
every optimizer step sees the same 8 blocks. Both use Muon with fp32 Newton-Schulz and fp32 FSDP
parameters: the only differences are float summation orders (gradient all-reduce / reduce-scatter and
the split Newton-Schulz work), hence the tolerance: logged loss within LOSS_ATOL = 2e-5 at every step,
final parameters within rtol 1e-4 / atol 2e-5. Every run also drops a NaN into one gradient on rank 1
only at step 3 (after the reduction): the StabilityGuard must make both ranks skip that step, as the
reference does, or the runs drift apart.
"""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from osp.checkpoint_files import checkpoint_step, is_distributed_checkpoint
from osp.conf import compose
from osp.export import load_model
from osp.training.run import train
from tests.support.cli import REPO
from tests.support.training import subprocess_env, tiny_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LOSS_ATOL = 2e-5
STEPS = 10
COMMON = [
    "optim=muon", "optim.ns_dtype=fp32", "optim.lr=3e-3", "optim.warmup_steps=3",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=5", "callbacks.checkpoint.every_n_train_steps=5",
    "callbacks.outliers.every_n_steps=5", "callbacks.quant_eval.every_n_steps=5",
    "callbacks.stability.action=skip",
    "+callbacks.poison._target_=tests.support.callbacks.PoisonGradient", "+callbacks.poison.step=3",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], rendezvous: list[str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    launch = rendezvous or ["--standalone"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", *launch, "-m", "osp", "train",
           *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        output = proc.stdout[-3000:] + "\n" + proc.stderr[-5000:]
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{output}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as handle:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")}


def assert_same_training(run_dir: Path, reference: Path) -> None:
    got, ref = losses(run_dir), losses(reference)
    assert got.keys() == ref.keys() == set(range(STEPS))
    worst = max(abs(got[s] - ref[s]) for s in ref)
    assert worst <= LOSS_ATOL, f"loss differs by up to {worst:.2e} from the 1-process run"
    mine, _ = load_model(run_dir)  # a single .ckpt file (DDP) or a distributed folder (FSDP2)
    expected, _ = load_model(reference)
    for (name, p), (_, q) in zip(mine.named_parameters(), expected.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=name)
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert summary["skipped_steps"] == ref_summary["skipped_steps"] == 1
    assert summary["world_size"] == 2 and summary["tokens_seen"] == ref_summary["tokens_seen"]
    # Metric callbacks reduce over ranks: the same numbers as on one process.
    for key in ("val_loss", "kurtosis", "kurtosis_exact", "max_abs", "ppl_fp", "ppl_w4a4"):
        assert summary[key] == pytest.approx(ref_summary[key], rel=1e-3, abs=1e-4), key


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist_runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.warns(UserWarning, match="non-finite gradient at step 3: skipping"):
            train(compose(tiny_overrides(corpus, root, *COMMON, "run_name=reference")))
    finally:
        torch.set_num_threads(threads)
    return root / "reference"


def test_ddp_matches_one_process(corpus, reference):
    root = reference.parent
    torchrun(tiny_overrides(corpus, root, *COMMON, "trainer=ddp", "trainer.precision=32-true",
                            "data.batch_size=4", "run_name=ddp"))
    run_dir = root / "ddp"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert_same_training(run_dir, reference)


def test_fsdp_preempted_and_resumed_matches_one_process(corpus, reference):
    """FSDP2 (with activation checkpointing) without a run name: both ranks must agree on one run dir.
    Rank 1 signals torchrun's agent after step 4; the agent forwards SIGTERM to both workers, which save a
    distributed checkpoint together and stop; resume=auto then finishes the run."""
    root = reference.parent / "fsdp_runs"
    args = tiny_overrides(corpus, root, *COMMON, "trainer=fsdp", "trainer.strategy.param_dtype=fp32",
                          "data.batch_size=4", "activation_checkpointing=true")
    signal_at = ["+callbacks.kill._target_=tests.support.callbacks.SignalAt", "+callbacks.kill.step=4",
                 "+callbacks.kill.target=parent"]
    stopped = torchrun([*args, *signal_at], ["--master-port", str(free_port())], check=False)
    assert stopped.returncode != 0
    assert "osp train: stopped by SIGTERM after step" in stopped.stderr, stopped.stderr[-3000:]
    (run_dir,) = root.iterdir()  # one run dir for both ranks
    last = run_dir / "checkpoints" / "last.ckpt"
    assert is_distributed_checkpoint(last) and 4 <= checkpoint_step(last) < STEPS

    torchrun([*args, f"run_name={run_dir.name}", "resume=auto"], ["--master-port", str(free_port())])
    assert_same_training(run_dir, reference)
    # Rank hygiene: one config, one job log, one export, one tokenizer, all from rank 0.
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert [p.name for p in run_dir.glob("*.log")] == ["train.log"]
    assert (run_dir / "export" / "config.json").is_file()
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()


def test_ddp_ranks_stop_together_on_a_nan_only_one_of_them_sees(corpus, tmp_path):
    """action=stop: rank 1 alone holds the NaN; both ranks must raise (a rank left alone would hang in the
    next collective until the process-group timeout)."""
    args = tiny_overrides(corpus, tmp_path, *COMMON, "trainer=ddp", "trainer.precision=32-true",
                          "data.batch_size=4", "callbacks.stability.action=stop", "run_name=stop",
                          "~callbacks.outliers", "~callbacks.quant_eval", "~callbacks.export")
    proc = torchrun(args, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count(
        "osp train: error: non-finite gradient at step 3 (on at least one of 2 ranks)") == 2
