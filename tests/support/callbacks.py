"""Test-only callbacks, added to `osp train` runs by Hydra:
`+callbacks.<name>._target_=tests.training....`."""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Any

import lightning as L
import torch

from osp.optim.distributed import local


def _is_rank(trainer: L.Trainer, rank: int) -> bool:
    """rank -1 means the last rank (rank 0 when there is one process)."""
    return trainer.global_rank == (trainer.world_size - 1 if rank < 0 else rank)


class SlowSteps(L.Callback):
    """Sleeps after every step, so that a test can signal a run in the middle of training."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        time.sleep(self.seconds)


class PoisonGradient(L.Callback):
    """At optimizer step `step` (or each of a list of steps), puts a NaN into this rank's (local shard of a)
    gradient, on one rank only: after the DDP all-reduce / FSDP reduce-scatter, so no other rank sees it
    unless the guard tells them."""

    def __init__(self, step: int | list[int], rank: int = -1) -> None:
        self.steps = [int(s) for s in step] if not isinstance(step, int) else [step]
        self.rank = rank

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step in self.steps and _is_rank(trainer, self.rank):
            grad = pl_module.model.layers[0].mlp.up_proj.weight.grad
            with torch.no_grad():
                local(grad).view(-1)[0] = float("nan")


class SignalAt(L.Callback):
    """After optimizer step `step`, one rank sends `signal` to itself or to its parent (torchrun's agent,
    which forwards it to every worker): a preemption arriving unannounced in the middle of training."""

    def __init__(self, step: int, rank: int = -1, target: str = "self", signal_name: str = "SIGTERM") -> None:
        self.step, self.rank, self.target, self.signum = step, rank, target, getattr(signal, signal_name)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and _is_rank(trainer, self.rank):
            os.kill(os.getppid() if self.target == "parent" else os.getpid(), self.signum)


class SignalAtTrainEnd(L.Callback):
    """SIGTERM to this process at the end of training: a preemption that lands during the final evaluations
    and the export."""

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


class _FailWhenPickled:
    """Put into a checkpoint, it fails the checkpoint write from inside torch.save (the staging file is
    open by then)."""

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def __reduce__(self) -> Any:
        if self.fault == "kill":  # kill -9 in the middle of writing <name>.tmp
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write() on a full disk raises


class FailSaveAt(L.Callback):
    """The checkpoint of optimizer step `step` fails while torch.save writes it: fault=nospace raises
    ENOSPC (a full disk), fault=kill SIGKILLs the process (kill -9 during the write)."""

    def __init__(self, step: int, fault: str = "nospace") -> None:
        self.step, self.fault = step, fault

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.global_step == self.step:
            checkpoint["fail_save"] = _FailWhenPickled(self.fault)
