"""StepProgress: one progress bar over optimizer steps (not epochs), with loss, val loss and tokens/s."""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm


class StepProgress(ProgressBar):
    """Pre-training runs are measured in steps; epochs over a packed corpus mean little.

    Subclassing ProgressBar stops Lightning from adding its own epoch-based bar.
    """

    def __init__(self, refresh_every: int = 1) -> None:
        super().__init__()
        self.refresh_every = refresh_every
        self._bar: tqdm | None = None
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._bar = tqdm(total=total, initial=trainer.global_step, desc="train", unit="step",
                         dynamic_ncols=True, file=sys.stdout, smoothing=0.1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._bar is None:
            return
        self._bar.update(trainer.global_step - self._bar.n)
        if trainer.global_step % self.refresh_every == 0:
            self._bar.set_postfix(self._postfix(trainer), refresh=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self._postfix(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @staticmethod
    def _postfix(trainer: L.Trainer) -> dict[str, str]:
        metrics = trainer.callback_metrics
        out = {}
        for key, label, spec in (("train/loss", "loss", ".3f"), ("val/loss", "val", ".3f"),
                                 ("tok/s", "tok/s", ",.0f")):
            if key in metrics:
                value = float(metrics[key])
                out[label] = format(value, spec) if math.isfinite(value) else str(value)
        return out
