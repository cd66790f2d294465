"""QuantEval callback: cadence, logged keys, values, final_metrics, and DDP (2 ranks, gloo, spawn)."""

from __future__ import annotations

import csv
import math

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from osp.model import ModelConfig, Transformer
from osp.quant import perplexity
from osp.training.callbacks.quant_eval import QuantEval


class TinyLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Transformer(
            ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=1, max_seq_len=16)
        )

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class TinyData(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.heldout_calls = 0

    def train_dataloader(self) -> DataLoader:
        data = torch.randint(0, 64, (32, 17), generator=torch.Generator().manual_seed(0))
        return DataLoader(list(data), batch_size=4)

    def heldout_blocks(self, n: int) -> torch.Tensor:
        self.heldout_calls += 1
        return torch.randint(0, 64, (n, 17), generator=torch.Generator().manual_seed(1))


def _trainer(tmp_path, callback: QuantEval, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=CSVLogger(tmp_path, name="csv", version=0),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,  # QuantEval must not depend on Lightning's logging throttle
        **kwargs,
    )


@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_logs_every_n_steps_and_at_train_end(tmp_path):
    callback = QuantEval(every_n_steps=2, num_blocks=3, batch_size=2, extra_presets=["w4a16", "w4a4kv4+had"])
    module, data = TinyLM(), TinyData()
    _trainer(tmp_path, callback, devices=1).fit(module, datamodule=data)
    assert data.heldout_calls == 1
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("quant/ppl_w4a4")]
    assert [int(r["step"]) for r in rows] == [2, 4, 5]  # steps 2 and 4, then the end of training
    for key in ("quant/ppl_fp", "quant/ppl_w4a4", "quant/ratio", "quant/ppl_w4a16", "quant/ppl_w4a4kv4_had"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    final = callback.final_metrics()
    blocks = data.heldout_blocks(3)
    assert final["ppl_fp"] == pytest.approx(perplexity(module.model, blocks), rel=1e-6)
    assert final["ppl_w4a4"] == pytest.approx(perplexity(module.model, blocks, "w4a4kv4"), rel=1e-6)
    assert final["quant_ratio"] == pytest.approx(final["ppl_w4a4"] / final["ppl_fp"])
    assert final["quant_preset"] == "w4a4kv4"  # what ppl_w4a4 measures, named in the summary
    assert float(rows[-1]["quant/ppl_w4a4"]) == pytest.approx(final["ppl_w4a4"])


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="unknown quant preset"):
        QuantEval(extra_presets=["int4"])
    with pytest.raises(ValueError, match="twice"):
        QuantEval(extra_presets=["w4a16", "w4a16"])
    with pytest.raises(ValueError, match="calibration"):
        QuantEval(extra_presets=["w4a4kv4+gptq"])


@pytest.mark.distributed
def test_ddp_ranks_agree_with_a_single_process(tmp_path):
    # 3 blocks on 2 ranks: rank 0 evaluates 2, rank 1 evaluates 1 plus an uncounted padding block.
    callback = QuantEval(every_n_steps=100, num_blocks=3, batch_size=1)
    module, data = TinyLM(), TinyData()
    trainer = _trainer(tmp_path, callback, devices=2, strategy="ddp_spawn")
    trainer.fit(module, datamodule=data)
    blocks = TinyData().heldout_blocks(3)
    got = float(trainer.callback_metrics["quant/ppl_w4a4"])
    assert got == pytest.approx(perplexity(module.model, blocks, "w4a4kv4"), rel=1e-5)
    assert float(trainer.callback_metrics["quant/ppl_fp"]) == pytest.approx(
        perplexity(module.model, blocks), rel=1e-5
    )
