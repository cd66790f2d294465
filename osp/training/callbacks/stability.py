"""StabilityGuard: a non-finite loss stops the run (or skips the step) with a message naming the step."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss."""


class StabilityGuard(L.Callback):
    """Watches the training loss.

    action=stop raises NonFiniteLossError at the first non-finite loss (the last good checkpoint stays
    usable); action=skip zeroes that step's gradients so the optimizer step is a no-op for the
    weights. A loss above `spike_factor` x its running mean is logged as `train/spike`.
    """

    def __init__(self, action: str = "stop", spike_factor: float = 3.0, ema: float = 0.98) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"callbacks.stability.action={action!r} is not allowed; choose one of ['stop', 'skip']")
        self.action, self.spike_factor, self.ema = action, spike_factor, ema
        self._mean: float | None = None
        self._skip_next_step = False
        self.skipped_steps = 0
        self.spikes = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss.detach()) if torch.is_tensor(loss) else float("nan")
        if not math.isfinite(value):
            return  # handled before the optimizer step
        if self._mean is not None and value > self.spike_factor * self._mean:
            self.spikes += 1
            pl_module.log("train/spike", value)
        self._mean = value if self._mean is None else self.ema * self._mean + (1 - self.ema) * value

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        loss = getattr(pl_module, "last_loss", None)
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        grads_finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
        loss_finite = loss is None or bool(torch.isfinite(loss))
        if loss_finite and grads_finite:
            return
        what = "loss" if not loss_finite else "gradient"
        step = trainer.global_step
        if self.action == "stop":
            raise NonFiniteLossError(
                f"non-finite {what} at step {step} (loss={float(loss) if loss is not None else 'n/a'}); "
                "stopping. Lower optim.lr, check the data, or set callbacks.stability.action=skip."
            )
        self.skipped_steps += 1
        rank_zero_warn(f"non-finite {what} at step {step}: skipping this optimizer step")
        for p in pl_module.parameters():
            p.grad = None

    def final_metrics(self) -> dict[str, float]:
        return {"skipped_steps": float(self.skipped_steps), "loss_spikes": float(self.spikes)}
