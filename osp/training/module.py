"""LanguageModelModule: next-token loss, validation perplexity and optimizer wiring for one Transformer."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from osp.model import ModelConfig, Transformer
from osp.optim import build_optimizer, build_scheduler, describe_groups


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in fp32 (bf16 logits lose too much precision in log-softmax)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class LanguageModelModule(L.LightningModule):
    """Trains `self.model` (an osp Transformer) on batches of packed blocks (B, seq_len + 1)."""

    def __init__(self, model: dict[str, Any] | ModelConfig, optim: dict[str, Any] | DictConfig,
                 compile: bool = False) -> None:
        super().__init__()
        model_cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(dict(model))
        optim_cfg = OmegaConf.to_container(optim, resolve=True) if isinstance(optim, DictConfig) else dict(optim)
        self.save_hyperparameters({"model": model_cfg.to_dict(), "optim": optim_cfg, "compile": compile})
        self.model_cfg = model_cfg
        self.optim_cfg = optim_cfg
        self.model = Transformer(model_cfg)
        # Kept out of the module tree (object.__setattr__) so the compiled wrapper's parameters are not
        # registered a second time under another name in state_dict.
        object.__setattr__(self, "_forward", torch.compile(self.model) if compile else self.model)
        self.tokens_seen = 0
        self.last_loss: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._forward(input_ids)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        loss = next_token_loss(self(inputs), targets)
        self.last_loss = loss.detach()
        self.tokens_seen += targets.numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen), reduce_fx="max")
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        loss = next_token_loss(self(inputs), targets)
        # Every block has the same length, so the mean of batch means is the token-weighted mean.
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=targets.shape[0])

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", math.exp(min(float(loss), 50.0)), sync_dist=False, rank_zero_only=True)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.optim_cfg)
        total = int(self.trainer.max_steps) if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None:
            raise ValueError("trainer.max_steps must be set (> 0): the LR schedule is defined over it")
        scheduler = build_scheduler(optimizer, self.optim_cfg, total)
        if self.trainer.is_global_zero:
            print(describe_groups(optimizer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["osp"] = {"tokens_seen": self.tokens_seen, "model_config": self.model_cfg.to_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("osp", {}).get("tokens_seen", 0))
