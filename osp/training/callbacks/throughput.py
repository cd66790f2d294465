"""Throughput: tokens/s, step time and MFU from the real module's FLOPs."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L

from osp.hardware import device_peak_flops


class Throughput(L.Callback):
    """Logs perf/tokens_per_s (global), perf/step_time and perf/mfu over a sliding window of steps.

    tokens/s counts the global batch (every rank's tokens) over this rank's step time; MFU is per device.
    Nothing is saved in checkpoints: wall-clock rates describe the process that measured them, so a
    resumed run reports its own segment.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._times: deque[float] = deque(maxlen=window + 1)
        self._fit_start = 0.0
        self._train_seconds = 0.0
        self._step_start = 0.0
        self._tokens_per_step = 0
        self.tokens_per_s = float("nan")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_start = time.perf_counter()
        self._tokens_per_step = (batch.shape[1] - 1) * batch.shape[0] * trainer.world_size

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        self._train_seconds += now - self._step_start
        self._times.append(now)
        if len(self._times) < 2:
            return
        step_time = (self._times[-1] - self._times[0]) / (len(self._times) - 1)
        self.tokens_per_s = self._tokens_per_step / step_time
        metrics = {"perf/tokens_per_s": self.tokens_per_s, "perf/step_time": step_time}
        peak = device_peak_flops(pl_module.device)
        if peak is not None:
            seq_len = batch.shape[1] - 1
            flops = pl_module.model.flops_per_token(seq_len) * self.tokens_per_s / trainer.world_size
            metrics["perf/mfu"] = flops / peak
        pl_module.log("tok/s", self.tokens_per_s, prog_bar=True, logger=False)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def final_metrics(self) -> dict[str, float]:
        return {"tokens_per_s": self.tokens_per_s, "train_seconds": self._train_seconds}
