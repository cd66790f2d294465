"""Preemption: on SIGTERM/SIGUSR1, save `last.ckpt` at the next step boundary and stop; requeue under SLURM.

The signal handler only records the signal (nothing else is safe inside a handler). At the end of
each optimizer step every rank reports whether it saw a signal; the flags are reduced, so all ranks
save the same step together even when the signal reached only some of them. The checkpoint is
written atomically at that step's end; the run then lets Lightning log the step (and run a
validation that is due at it, which a resumed run would skip) and stops with `Preempted` before the
next batch, skipping end-of-training work (export, final evaluations) that a grace period has no
room for. `osp train ... resume=auto` continues exactly where it stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from osp.errors import ConfigError
from osp.training.checkpoints import save_last

SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; rerun with resume=auto to continue."""

    def __init__(self, signum: int, step: int, checkpoint: Path, requeue: bool = False) -> None:
        self.signum, self.step, self.checkpoint, self.requeue = signum, step, checkpoint, requeue
        super().__init__(self.describe())

    def describe(self, run_name: str | None = None) -> str:
        """The stop and the command that continues the run (which must name the run: the default run name
        is a timestamp, so "the same command" would start a new run)."""
        how = (f"`osp train ... run_name={run_name} resume=auto` (your overrides, plus these two)" if run_name
               else "the same command with run_name=<this run> resume=auto")
        return (f"stopped by {signal.Signals(self.signum).name} after step {self.step}; checkpoint saved to "
                f"{self.checkpoint}. Continue with {how}")

    @property
    def exit_code(self) -> int:
        """128 + signal number, the shell's convention for 'ended by this signal' (so schedulers retry)."""
        return 128 + self.signum


class Preemption(L.Callback):
    """Turns preemption signals into a checkpoint at a step boundary and a clean stop.

    signals: names of the signals to catch (SIGTERM: scheduler preemption, `kill`, torchrun shutdown;
    SIGUSR1: SLURM's `--signal=USR1@<seconds>` warning before the time limit).
    requeue: under SLURM, after a SIGUSR1 checkpoint, `osp train` (rank 0) runs `scontrol requeue`, so a
    job that reaches its time limit comes back and resumes (`--requeue` jobs preempted with SIGTERM are
    requeued by SLURM itself).

    Lightning's own SIGTERM handling (stop without saving; a collective inside the signal handler) and
    SLURM auto-requeue handler (a save in the middle of a step) are replaced while training runs;
    Lightning puts its handlers back at teardown.
    """

    def __init__(self, signals: list[str] | tuple[str, ...] = SIGNALS, requeue: bool = True) -> None:
        unknown = [n for n in signals if not isinstance(getattr(signal, str(n), None), signal.Signals)]
        if unknown:
            raise ConfigError(f"callbacks.preemption.signals: unknown signal(s) {unknown}; "
                             f"e.g. {list(SIGNALS)}")
        self.signals = [getattr(signal, str(name)) for name in signals]
        self.requeue = requeue
        self.received: int | None = None
        self.pending: Preempted | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = 0

    # signal side ---------------------------------------------------------------------------------

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the step to end
        if self.received is None:
            self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self.pending = None, None
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("Preemption: not in the main thread, signals cannot be caught; preemption "
                           "will not save a checkpoint")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Training ended right after the saved step (max_steps). The handlers stay until teardown: a signal
        # during the end-of-training work of any callback (final evaluations, the export) stays in
        # `received`, and osp.training.run stops the run after fit (late_signal).
        self.pending = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # training side -------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.pending is not None:
            raise self.pending  # the saved step is logged (and validated); its successor must not train
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start:  # gradient accumulation: not a step boundary
            return
        # A collective on every rank at every step: all ranks stop at the same step or none does.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        signum = self.received if self.received is not None else signal.SIGTERM  # a signal seen elsewhere
        path = self.save(trainer)
        requeue = self.requeue and signum == signal.SIGUSR1 and bool(os.environ.get("SLURM_JOB_ID"))
        self.pending = Preempted(signum, trainer.global_step, path, requeue=requeue)

    def save(self, trainer: L.Trainer) -> Path:
        """Write last.ckpt where ModelCheckpoint keeps it (collective: every rank calls it)."""
        path = save_last(trainer)
        rank_zero_info(f"Preemption: step {trainer.global_step} saved to {path}")
        return path


def requeue_slurm_job() -> None:
    """`scontrol requeue` this SLURM job: SLURM ends it and queues it again under the same job id (so the
    same run dir, and resume=auto picks up the checkpoint). Called once, by rank 0, after the checkpoint."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        job = f"{array_job}_{array_task}"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"Preemption: could not run `scontrol requeue {job}` ({err}); resubmit the job")
        return
    if result.returncode == 0:
        rank_zero_info(f"Preemption: requeued SLURM job {job}")
    else:
        rank_zero_warn(f"Preemption: `scontrol requeue {job}` failed: {result.stderr.strip()}")
