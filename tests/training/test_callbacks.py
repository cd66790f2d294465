"""Training-loop callbacks in a tiny in-process Lightning run."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from osp.model import ModelConfig
from osp.training.callbacks.progress import StepProgress
from osp.training.callbacks.stability import NonFiniteLossError, StabilityGuard
from osp.training.callbacks.throughput import Throughput
from osp.training.loggers import wandb_mode
from osp.training.module import LanguageModelModule, next_token_loss
from osp.training.summary import format_summary

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=16)
OPTIM = {"name": "adamw", "lr": 1e-2, "warmup_steps": 2, "schedule": "constant"}


class RepeatingBlocks(L.LightningDataModule):
    """A periodic token sequence: easy to learn, so the loss must fall."""

    def __init__(self, n: int = 64, seq_len: int = 16) -> None:
        super().__init__()
        base = torch.arange(n * (seq_len + 1)) % 7
        self.blocks = base.view(n, seq_len + 1)

    def train_dataloader(self):
        return DataLoader(self.blocks, batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.blocks[:16], batch_size=8)


def fit(callbacks, steps=12, module=None):
    module = module or LanguageModelModule(CFG, OPTIM)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        callbacks=callbacks, val_check_interval=6, check_val_every_n_epoch=None,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=RepeatingBlocks())
    return trainer, module


def test_loss_falls_and_throughput_is_reported(one_thread):
    throughput = Throughput(window=4)
    trainer, module = fit([throughput, StepProgress()], steps=30)
    assert float(trainer.callback_metrics["train/loss"]) < 1.0
    assert throughput.final_metrics()["tokens_per_s"] > 0
    assert module.tokens_seen == 30 * 8 * 16


def test_next_token_loss_is_mean_cross_entropy():
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    manual = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    assert torch.allclose(next_token_loss(logits, targets), manual)


class NaNAfter(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.lm_head.weight.fill_(float("nan"))


def test_stability_guard_stops_naming_the_step():
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
        fit([StabilityGuard(action="stop"), NaNAfter(3)], steps=6)


def test_stability_guard_skip_leaves_weights_untouched():
    module = LanguageModelModule(CFG, OPTIM)
    guard = StabilityGuard(action="skip")

    class Poison(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 2:
                pl_module.model.layers[0].mlp.up_proj.weight.grad.fill_(float("nan"))

    snapshot, compared = {}, []

    class Snap(L.Callback):
        """Weights before and after the poisoned batch (the one that starts at global step 2)."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2 and not snapshot:
                snapshot.update(batch_idx=batch_idx, weights={k: v.clone() for k, v in
                                                              pl_module.model.state_dict().items()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if snapshot and batch_idx == snapshot["batch_idx"]:
                compared.append({k: torch.equal(v, snapshot["weights"][k])
                                 for k, v in pl_module.model.state_dict().items()})

    with pytest.warns(UserWarning, match="non-finite gradient at step 2: skipping"):
        fit([guard, Poison(), Snap()], steps=5, module=module)
    assert len(compared) == 1 and compared[0] and all(compared[0].values()), compared  # the check ran, once
    assert guard.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def test_bad_stability_action_is_named():
    with pytest.raises(ValueError, match="callbacks.stability.action='ignore'"):
        StabilityGuard(action="ignore")


def test_wandb_mode(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(None) == "online"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("online") == "offline"


def test_summary_shows_what_it_has():
    s = {"run_name": "r", "steps": 3, "wall_seconds": 1.0, "tokens_seen": 10, "tokens_per_s": 5.0,
         "train_loss": 2.0, "val_loss": 2.5, "ln_vocab": math.log(64), "val_ppl": math.exp(2.5),
         "checkpoint": None, "logs": "x.csv", "run_dir": "/tmp/r", "d_model": 32}
    text = format_summary(s)
    assert "val ppl        12.18" in text and "W4A4" not in text
