"""LanguageModelModule: next-token loss, validation perplexity and optimizer wiring for one Transformer.

Parallelism is applied in `configure_model` (activation checkpointing; FSDP2 under `trainer=fsdp`), from
outside the model. Checkpoints carry every rank's RNG state besides what Lightning saves (weights,
optimizer and LR schedule, loop and data position, callback states), so a resumed run continues
exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from osp.errors import ConfigError
from osp.model import ModelConfig, Transformer
from osp.optim import OptimConfig, describe_groups
from osp.training.checkpoints import capture_rng, restore_rng
from osp.training.loggers import ResumableCSVLogger
from osp.training.parallel import apply_activation_checkpointing, apply_fsdp, fsdp_options_of, is_sharded
from osp.training.tail_loss import TailLoss, TailLossConfig


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in fp32 (bf16 logits lose too much precision in log-softmax)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class LanguageModelModule(L.LightningModule):
    """Trains `self.model` (an osp Transformer) on batches of packed blocks (B, seq_len + 1)."""

    def __init__(self, model: dict[str, Any] | ModelConfig, optim: dict[str, Any] | DictConfig | OptimConfig,
                 compile: bool = False, activation_checkpointing: bool = False,
                 run_record: dict[str, Any] | None = None,
                 loss: dict[str, Any] | TailLossConfig | None = None) -> None:
        super().__init__()
        self.run_record = run_record  # the run's config and data fingerprints (osp.training.run_record)
        model_cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(dict(model))
        optim_cfg = OptimConfig.from_dict(optim)
        loss_cfg = TailLossConfig.from_dict(loss)
        self.save_hyperparameters({"model": model_cfg.to_dict(), "optim": optim_cfg.to_dict(),
                                   "compile": compile, "activation_checkpointing": activation_checkpointing,
                                   "loss": loss_cfg.to_dict()})
        self.model_cfg = model_cfg
        self.optim_cfg = optim_cfg
        self.activation_checkpointing = activation_checkpointing
        self.model = Transformer(model_cfg)
        # Training-only loss terms (none by default: then no hook is registered at all).
        self.tail_loss = TailLoss(self.model, loss_cfg) if loss_cfg.ffn_tail_weight > 0 else None
        # Kept out of the module tree (object.__setattr__) so the compiled wrapper's parameters are not
        # registered a second time under another name in state_dict.
        object.__setattr__(self, "_forward", torch.compile(self.model) if compile else self.model)
        self.tokens_seen = 0
        self.last_loss: torch.Tensor | None = None
        self._checkpointed = False
        self._resumed_rng: dict[str, Any] | None = None
        self._resumed = False

    def configure_model(self) -> None:
        """Activation checkpointing (if asked), then FSDP2 when the strategy shards (trainer=fsdp).

        Lightning calls this hook for every stage (fit, then validate), so each is applied once only.
        """
        if self.activation_checkpointing and not self._checkpointed:
            apply_activation_checkpointing(self.model)
            self._checkpointed = True
        options = fsdp_options_of(self._trainer.strategy) if self._trainer is not None else None
        if options is not None and not is_sharded(self.model):
            apply_fsdp(self.model, self.device_mesh["data_parallel"], options)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._forward(input_ids)

    def objective(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(next-token cross-entropy, what the optimizer minimizes: it plus the training-only loss terms)."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if self.tail_loss is None:
            loss = next_token_loss(self(inputs), targets)
            return loss, loss
        with self.tail_loss.collecting(self.global_step if self._trainer is not None else 0):
            logits = self(inputs)
        loss = next_token_loss(logits, targets)
        return loss, loss + self.tail_loss.total()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, objective = self.objective(batch)  # train/loss stays the cross-entropy, comparable across runs
        if self.tail_loss is not None:
            self.log("train/ffn_tail", objective.detach() - loss.detach(), sync_dist=True)
        targets = batch[:, 1:]
        self.last_loss = loss.detach()
        self.tokens_seen += targets.numel() * self.trainer.world_size
        # The mean over ranks (one scalar all-reduce): the curve of the global batch, whatever the world size.
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/tokens", float(self.tokens_seen), reduce_fx="max")
        return objective

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        loss = next_token_loss(self(inputs), targets)
        # Every block has the same length, so the mean of batch means is the token-weighted mean.
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=targets.shape[0])

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            # val/loss is already the mean over ranks, so every rank holds this value; sync_dist only spares
            # the warning Lightning gives for unsynced epoch-level metrics.
            self.log("val/ppl", math.exp(min(float(loss), 50.0)), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optim_cfg.build(self.model)
        total = int(self.trainer.max_steps) if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None:
            raise ConfigError("trainer.max_steps must be set (> 0): the LR schedule is defined over it")
        scheduler = self.optim_cfg.build_scheduler(optimizer, total)
        if self.trainer.is_global_zero:
            print(describe_groups(optimizer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank calls this hook (rank 0 writes the file), so the RNG states of all ranks are gathered.
        # csv_rows: where a resumed run continues metrics.csv (see osp.training.loggers).
        csv_rows = next((lg.rows_logged for lg in self.loggers if isinstance(lg, ResumableCSVLogger)), None)
        checkpoint["osp"] = {"tokens_seen": self.tokens_seen, "model_config": self.model_cfg.to_dict(),
                             "rng": gather_objects(capture_rng()), "csv_rows": csv_rows,
                             "run": self.run_record}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("osp", {})
        self.tokens_seen = int(state.get("tokens_seen", 0))
        states = state.get("rng") or []
        rank = self.trainer.global_rank if self._trainer is not None else 0
        # Applied in on_train_start: building the loaders between here and the first step draws from
        # the global RNG, which the uninterrupted run did at a different time.
        self._resumed_rng = states[rank] if rank < len(states) else None
        self._resumed = True

    def on_train_start(self) -> None:
        if self._resumed:  # the optimizer and schedule are restored by now: this run's settings win
            self.optim_cfg.reapply(self.optimizers(use_pl_optimizer=False), self.lr_schedulers(), self.model)
            self._resumed = False
        if self._resumed_rng is not None:
            restore_rng(self._resumed_rng)
            self._resumed_rng = None


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
