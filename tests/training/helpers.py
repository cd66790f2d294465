"""Test-only callbacks, added to `osp train` runs by Hydra: `+callbacks.<name>._target_=tests.training....`."""

from __future__ import annotations

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
    """At optimizer step `step`, puts a NaN into this rank's (local shard of a) gradient, on one rank only:
    after the DDP all-reduce / FSDP reduce-scatter, so no other rank sees it unless the guard tells them."""

    def __init__(self, step: int, rank: int = -1) -> None:
        self.step, self.rank = step, rank

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self.step and _is_rank(trainer, self.rank):
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
