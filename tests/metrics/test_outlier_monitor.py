"""OutlierMonitor in tiny Lightning runs: logged keys, history, plots, alarm, and the report on its CSV."""

import csv
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from osp.metrics import report
from osp.model import ModelConfig, Transformer
from osp.training.callbacks.outliers import OutlierMonitor

VOCAB, SEQ = 64, 16


class TinyModule(L.LightningModule):
    """Just enough of a language-model module: `.model` is the osp Transformer."""

    def __init__(self) -> None:
        super().__init__()
        cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=SEQ)
        self.model = Transformer(cfg)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        assert self.model.training, "the monitor must restore train mode"
        logits = self.model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class TinyData(L.LightningDataModule):
    """Random blocks (B, SEQ + 1) and deterministic held-out blocks, like PretrainDataModule."""

    def train_dataloader(self) -> DataLoader:
        blocks = torch.randint(0, VOCAB, (64, SEQ + 1), generator=torch.Generator().manual_seed(1))
        return DataLoader(blocks, batch_size=4)

    def heldout_blocks(self, n: int) -> torch.Tensor:
        return torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(2))


def fit(tmp_path: Path, monitor: OutlierMonitor, max_steps: int = 6) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=str(tmp_path),
        logger=CSVLogger(save_dir=str(tmp_path), name="", version="csv"), log_every_n_steps=1,
        callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyModule(), datamodule=TinyData())
    return trainer


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_monitor_logs_history_plots_and_summary(tmp_path):
    monitor = OutlierMonitor(every_n_steps=2, n_blocks=3)
    trainer = fit(tmp_path, monitor, max_steps=5)

    # Step 0 (init), every 2 steps, and train end (step 5).
    assert [entry["step"] for entry in monitor.history] == [0, 2, 4, 5]
    rows = read_csv(tmp_path / "csv" / "metrics.csv")
    expected = {
        "outliers/kurtosis/layer_00", "outliers/kurtosis/layer_02", "outliers/kurtosis_mean",
        "outliers/kurtosis_exact_mean", "outliers/kurtosis_floor", "outliers/max_abs/layer_01",
        "outliers/max_abs_max", "outliers/max_median_mean", "outliers/channel_kurtosis_mean",
    }
    assert expected <= set(rows[0])
    logged_steps = sorted(int(r["step"]) for r in rows if r["outliers/kurtosis_mean"])
    assert logged_steps == [0, 2, 4, 5]
    assert "outliers/kurtosis/layer_03" not in rows[0]  # L + 1 = 3 taps
    assert "outliers/kurtosis_mean" in trainer.callback_metrics

    final = monitor.final_metrics()
    last = monitor.history[-1]
    assert final["kurtosis"] == last["outliers/kurtosis_mean"]
    assert final["kurtosis_exact"] == last["outliers/kurtosis_exact_mean"]
    assert final["max_abs"] == last["outliers/max_abs_max"]
    assert final["kurtosis_floor"] == pytest.approx(0.2, abs=0.05)  # d = 32
    # The quantizer's inputs (linear_inputs is on by default): the down_proj input per layer and per kind.
    assert {"outliers/linear_max_median/block_01.mlp.down_proj",
            "outliers/linear_channel_share/block_00.mlp.down_proj", "outliers/down_proj_max_median_mean",
            "outliers/norm_fed_max_median_mean", "outliers/gate_up_alignment/layer_01"} <= set(rows[0])
    downs = [last[f"outliers/linear_max_median/block_{b:02d}.mlp.down_proj"] for b in range(2)]
    assert final["down_proj_max_median"] == pytest.approx(sum(downs) / 2)
    assert 0 < final["down_proj_channel_share"] <= 1 and 0 <= final["gate_up_alignment"] <= 1
    for kind in ("kurtosis_heatmap", "kurtosis_exact_heatmap", "max_abs", "down_proj_max_median"):
        name = f"outliers_{kind}.png"
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The run dir this produced is readable by `osp report` (CSV only, no summary.json).
    run = report.load_run(tmp_path)
    logged = run.value((), ("outliers/kurtosis_mean",))
    assert logged == pytest.approx(last["outliers/kurtosis_mean"], rel=1e-5)


def test_monitor_state_survives_a_checkpoint():
    monitor = OutlierMonitor()
    monitor.history = [{"step": 3.0, "outliers/kurtosis_mean": 1.0}]
    restored = OutlierMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.history == monitor.history and restored._last_step == 3


@pytest.mark.slow
def test_alarm_warns_and_names_the_layer(tmp_path):
    monitor = OutlierMonitor(every_n_steps=2, n_blocks=2, exact=False, plots=False, alarm_kurtosis=-1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(tmp_path, monitor, max_steps=4)
    messages = [str(w.message) for w in caught if "alarm_kurtosis" in str(w.message)]
    assert trainer.global_step == 4
    assert [m.split(" at step ")[1].split(":")[0] for m in messages] == ["0", "2", "4"]
    assert "alarm_kurtosis=-1 at step 2: kurtosis/layer_00 = " in messages[1]
    assert monitor.final_metrics()["kurtosis_alarm_step"] == 0


@pytest.mark.slow
def test_alarm_stops_the_run(tmp_path):
    monitor = OutlierMonitor(every_n_steps=2, n_blocks=2, exact=False, plots=False, alarm_kurtosis=-1.0,
                             alarm_action="stop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(tmp_path, monitor, max_steps=10)
    # Step 0 (the initial weights) only warns; the first in-loop measurement stops the run.
    assert trainer.global_step == 2
    assert any("Stopping the run" in str(w.message) for w in caught)


def test_bad_arguments_and_missing_datamodule(tmp_path):
    with pytest.raises(ValueError, match="alarm_action"):
        OutlierMonitor(alarm_action="explode")
    with pytest.raises(ValueError, match="every_n_steps"):
        OutlierMonitor(every_n_steps=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[OutlierMonitor()],
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="heldout_blocks"):
        trainer.fit(TinyModule(), train_dataloaders=TinyData().train_dataloader())


class RankOneAlarm(OutlierMonitor):
    """Only rank 1 sees an alarm: the ranks must still stop together (else DDP would hang)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.alarm_kurtosis = -1.0 if trainer.global_rank == 1 else 1e9


@pytest.mark.distributed
def test_ddp_ranks_stop_together(tmp_path):
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    monitor = RankOneAlarm(every_n_steps=2, n_blocks=2, exact=False, plots=False, alarm_action="stop")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=8, default_root_dir=str(tmp_path),
        # A short collective timeout turns a rank mismatch into an error instead of a hang.
        strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo",
                             timeout=timedelta(seconds=60)),
        logger=CSVLogger(save_dir=str(tmp_path), name="", version="csv"), log_every_n_steps=1,
        callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyModule(), datamodule=TinyData())
    rows = read_csv(tmp_path / "csv" / "metrics.csv")
    assert max(int(r["step"]) for r in rows if r.get("outliers/kurtosis_mean")) == 2
    assert max(int(r["step"]) for r in rows if r.get("train/loss")) < 3
