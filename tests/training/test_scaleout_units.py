"""Pieces of scale-out and survival, each on its own: strategies as configs, atomic checkpoints, finding the
checkpoint to resume, run-id agreement, activation checkpointing, the CSV continuation, guard state."""

from __future__ import annotations

import csv
import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed import TCPStore

from osp.atomic import replace_path
from osp.checkpoint_files import latest_checkpoint
from osp.conf import compose
from osp.conf import resolvers as resolvers_module
from osp.errors import ConfigError
from osp.model import ModelConfig, Transformer
from osp.training.callbacks.stability import StabilityGuard
from osp.training.checkpoints import AtomicCheckpointIO, resolve_resume
from osp.training.loggers import ContinuedExperimentWriter, wandb_run_id
from osp.training.parallel import FSDP2Strategy, apply_activation_checkpointing
from osp.training.run import preflight
from tests.support.cli import REPO


def save(path: Path, step: int) -> Path:
    torch.save({"global_step": step, "state_dict": {"w": torch.zeros(2)}}, path)
    return path


def distributed_folder(path: Path, step: int) -> Path:
    """The layout Lightning's ModelParallelStrategy writes: DCP `.metadata` + shards, and meta.pt."""
    path.mkdir()
    (path / ".metadata").write_bytes(b"dcp")
    torch.save({"global_step": step}, path / "meta.pt")
    return path


# Strategies --------------------------------------------------------------------------------------


def test_trainer_group_offers_ddp_and_fsdp(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "8")
    ddp = compose(["trainer=ddp"]).trainer
    # cpu.yaml's keys are inherited (and the tiny recipe's max_steps still applies)
    assert (ddp.devices, ddp.num_nodes, ddp.max_steps, ddp.log_every_n_steps) == (4, 2, 300, 10)
    assert isinstance(instantiate(ddp.strategy), DDPStrategy)
    fsdp = compose(["trainer=fsdp", "trainer.strategy.param_dtype=fp32"]).trainer
    strategy = instantiate(fsdp.strategy)
    assert isinstance(strategy, FSDP2Strategy) and fsdp.precision == "32-true"
    assert strategy.fsdp_options.param_dtype == torch.float32
    assert strategy.fsdp_options.reduce_dtype == torch.float32
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert compose(["trainer=ddp"]).trainer.devices == "auto"  # no torchrun: Lightning decides


def test_bad_strategy_settings_are_named():
    with pytest.raises(ConfigError, match="trainer.strategy.param_dtype='fp8'"):
        FSDP2Strategy(param_dtype="fp8")
    with pytest.raises(ConfigError, match="use trainer=fsdp"):
        preflight(compose(["trainer.strategy=fsdp"]))


def test_activation_checkpointing_keeps_names_and_gradients():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=16,
                      norm="ss")
    plain, checkpointed = Transformer(cfg), Transformer(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed)
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    ids = torch.randint(0, 64, (2, 16))
    for model in (plain, checkpointed):
        model(ids).float().logsumexp(-1).mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


# Checkpoints ---------------------------------------------------------------------------------------


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)

    def disk_full(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["global_step"] == 1 and not list(tmp_path.glob("*.tmp"))


def test_replace_path_swaps_folders(tmp_path):
    final = distributed_folder(tmp_path / "last.ckpt", 1)
    staging = distributed_folder(tmp_path / "last.ckpt.tmp", 2)
    replace_path(staging, final)
    assert torch.load(final / "meta.pt")["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_latest_checkpoint_takes_the_highest_step(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert latest_checkpoint(folder) is None
    save(folder / "step0000200.ckpt", 200)
    save(folder / "step0000400.ckpt", 400)
    last = save(folder / "last.ckpt", 400)
    assert latest_checkpoint(folder) == last  # a tie goes to last.ckpt
    preempted = distributed_folder(folder / "last-v1.ckpt", 437)
    (folder / "step0000600.ckpt").write_bytes(b"cut short by a crash")
    (folder / "step0000800.ckpt").mkdir()  # a folder whose save never finished
    with pytest.warns(UserWarning, match="skipping"):
        assert latest_checkpoint(folder) == preempted


def test_resume_accepts_auto_a_checkpoint_or_a_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    assert resolve_resume(None, run_dir) is None and resolve_resume("auto", run_dir) is None
    step = save(run_dir / "checkpoints" / "step0000010.ckpt", 10)
    folder = distributed_folder(run_dir / "checkpoints" / "last.ckpt", 12)
    assert resolve_resume("auto", run_dir) == str(folder)
    assert resolve_resume(str(step), tmp_path / "other") == str(step)
    assert resolve_resume(str(run_dir), tmp_path / "other") == str(folder)
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        resolve_resume(str(tmp_path / "missing.ckpt"), run_dir)


# Run identity ----------------------------------------------------------------------------------------


def test_torchrun_ranks_agree_on_rank0s_run_id(monkeypatch):
    """torchrun without --rdzv-id sets TORCHELASTIC_RUN_ID=none: rank 0's id goes through the agent store."""
    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30))  # plays torchrun's agent
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": "2",
                       "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_JOB_ID", "OSP_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(resolvers_module, "_RUN_ID", "20300101-000000")
    assert resolvers_module.run_id() == "20300101-000000"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(resolvers_module, "_RUN_ID", "20300101-000001")  # rank 1 started a second later
    assert resolvers_module.run_id() == "20300101-000000"
    assert wandb_run_id("osp/run 1") == "osp-run-1"


# Logs and guard state ----------------------------------------------------------------------------------


def test_resumed_csv_keeps_rows_written_before_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = [{"step": 3, "train/loss": 2.0}, {"step": 4, "outliers/kurtosis_mean": 0.5},  # before checkpoint
            {"step": 4, "train/loss": 1.9}, {"step": 5, "train/loss": 1.8}]  # after it: logged again
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["outliers/kurtosis_mean", "step", "train/loss"])
        writer.writeheader()
        writer.writerows(rows)
    writer = ContinuedExperimentWriter(str(tmp_path), resume_step=4, resume_rows=2)
    with path.open(newline="") as handle:
        kept = [(row["step"], row["train/loss"]) for row in csv.DictReader(handle)]
    assert kept == [("3", "2.0"), ("4", "")]
    writer.log_metrics({"train/loss": 1.85}, step=4)
    writer.save()
    assert writer.rows_on_disk == 3 and path.read_text().count("\n") == 4


def test_stability_guard_state_round_trips():
    guard = StabilityGuard(action="skip")
    guard._mean, guard.skipped_steps, guard.spikes = 2.5, 3, 1
    restored = StabilityGuard(action="skip")
    restored.load_state_dict(guard.state_dict())
    assert (restored._mean, restored.skipped_steps, restored.spikes) == (2.5, 3, 1)


# Launchers ---------------------------------------------------------------------------------------------

LAUNCH = REPO / "launch"


def test_torchrun_launcher_passes_overrides_after_its_own(tmp_path):
    env = {"PATH": os.environ["PATH"], "TORCHRUN": "echo", "NGPU": "4", "RECIPE": "osp", "RUN_NAME": "osp-x"}
    out = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "trainer.max_steps=7", "resume=null"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()[-1].split()
    assert out[:2] == ["--standalone", "--nproc-per-node=4"]
    assert out[out.index("-m"):] == ["-m", "osp", "train", "recipe=osp", "trainer=fsdp", "run_name=osp-x",
                                     "resume=auto", "trainer.max_steps=7", "resume=null"]


def test_slurm_script_starts_one_torchrun_per_node_with_a_c10d_rendezvous(tmp_path):
    for tool, body in (("srun", 'echo "$@"'), ("scontrol", 'printf "node-a\\nnode-b\\n"')):
        (tmp_path / tool).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / tool).chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64"}
    out = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "model.d_model=512"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    for part in ("--kill-on-bad-exit=1 torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-id=77",
                 "--rdzv-backend=c10d", "--rdzv-endpoint=node-a:29500", "SIGUSR1",
                 "-m osp train recipe=osp trainer=fsdp run_name=osp-slurm77 resume=auto model.d_model=512"):
        assert part in out, part
    script = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=USR1@" in script
