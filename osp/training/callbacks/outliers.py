"""OutlierMonitor: per-layer kurtosis, max|h| and max/median on a fixed held-out batch while training."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from osp.errors import ConfigError
from osp.metrics.activations import evaluate_kurtosis, outlier_log_dict, outlier_stats
from osp.metrics.plots import kurtosis_heatmap, layer_curves

ALARM_ACTIONS = ("warn", "stop")
PREFIX = "outliers"
# End-of-run summary key <- logged key of the last measurement (names as osp.training.summary prints them).
FINAL_KEYS = {
    "kurtosis": "kurtosis_mean",
    "kurtosis_exact": "kurtosis_exact_mean",
    "kurtosis_max": "kurtosis_max",
    "kurtosis_floor": "kurtosis_floor",
    "kurtosis_floor_ratio": "kurtosis_floor_ratio",
    "max_abs": "max_abs_max",
    "max_median": "max_median_mean",
    "channel_kurtosis": "channel_kurtosis_mean",
    # The linear inputs the 4-bit quantizer sees (linear_inputs=true): the SwiGLU product and the norm
    # outputs.
    "down_proj_kurtosis": "down_proj_kurtosis_mean",
    "down_proj_max_abs": "down_proj_max_abs_max",
    "down_proj_max_median": "down_proj_max_median_mean",
    "down_proj_channel_share": "down_proj_channel_share_mean",
    "norm_fed_max_median": "norm_fed_max_median_mean",
    "gate_up_alignment": "gate_up_alignment_mean",
}


class OutlierMonitor(L.Callback):
    """Measures hidden-state outliers every `every_n_steps` optimizer steps, at step 0 and at train end.

    The batch is `datamodule.heldout_blocks(n_blocks)[:, :-1]`, taken once at fit start, so every
    measurement sees the same tokens. Every rank runs the (cheap) measurement on that same batch:
    under FSDP the forward pass is collective anyway, and identical work keeps the ranks in step;
    only rank 0 writes to loggers and plots. Metrics (see `osp.metrics.outlier_log_dict`) go to every
    logger under `outliers/...`, PNG plots to `<default_root_dir>/plots/` at train end.

    alarm_kurtosis: if set, a tap whose kurtosis (context or osp_exact) exceeds it triggers
    alarm_action: "warn" (a warning naming layer, step and value) or "stop" (ends the run after
    this step). The step-0 (initial weights) and train-end measurements only warn.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        n_blocks: int = 8,
        exact: bool = True,
        linear_inputs: bool = True,
        max_tokens: int = 8192,
        alarm_kurtosis: float | None = None,
        alarm_action: str = "warn",
        plots: bool = True,
    ) -> None:
        if int(every_n_steps) <= 0:
            raise ConfigError(
                f"callbacks.outliers.every_n_steps must be a positive integer, got {every_n_steps!r}"
            )
        if int(n_blocks) <= 0:
            raise ConfigError(f"callbacks.outliers.n_blocks must be a positive integer, got {n_blocks!r}")
        if alarm_action not in ALARM_ACTIONS:
            raise ConfigError(
                f"callbacks.outliers.alarm_action={alarm_action!r} is not allowed; "
                f"choose one of {list(ALARM_ACTIONS)}"
            )
        self.every_n_steps = int(every_n_steps)
        self.n_blocks = int(n_blocks)
        self.exact = exact
        self.linear_inputs = linear_inputs
        self.max_tokens = int(max_tokens)
        self.alarm_kurtosis = None if alarm_kurtosis is None else float(alarm_kurtosis)
        self.alarm_action = alarm_action
        self.plots = plots
        self.history: list[dict[str, float]] = []
        self.alarm_step: int | None = None
        self.plot_paths: list[Path] = []
        self._input_ids: torch.Tensor | None = None

    # Lightning hooks ---------------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "heldout_blocks"):
            raise ConfigError(
                "OutlierMonitor needs a datamodule with heldout_blocks(n) (osp.data.PretrainDataModule); "
                "pass it as trainer.fit(module, datamodule=...) or remove callbacks.outliers"
            )
        blocks = datamodule.heldout_blocks(self.n_blocks)
        self._input_ids = blocks[:, :-1].contiguous()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The step-0 measurement is the baseline (at init, every tap should sit near the floor).
        if trainer.global_step == 0 and not self.history:
            self._measure(trainer, pl_module, in_loop=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches share one global_step: measure once.
        if step % self.every_n_steps == 0 and step != self._last_step:
            self._measure(trainer, pl_module, in_loop=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._measure(trainer, pl_module, in_loop=False)
        if self.plots and trainer.is_global_zero and self.history:
            self.plot_paths = self.write_plots(Path(trainer.default_root_dir) / "plots")
            self._log_images(trainer)

    def state_dict(self) -> dict[str, Any]:
        # The history travels with checkpoints so a resumed run plots its whole life.
        return {"history": self.history, "alarm_step": self.alarm_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.alarm_step = state_dict.get("alarm_step")

    # Measurement -------------------------------------------------------------------------------

    @property
    def _last_step(self) -> int:
        return int(self.history[-1]["step"]) if self.history else -1

    def measure(self, pl_module: L.LightningModule, precision_context: Any = None) -> dict[str, float]:
        """Outlier metrics of `pl_module.model` on the held-out batch (logger keys -> values)."""
        if self._input_ids is None:
            raise RuntimeError("OutlierMonitor has no held-out batch yet (it is taken in on_fit_start)")
        model = pl_module.model
        # Under the trainer's precision context the taps have the numerics the model trains with.
        with precision_context if precision_context is not None else contextlib.nullcontext():
            stats = outlier_stats(model, self._input_ids, "context", linear_inputs=self.linear_inputs,
                                  max_tokens=self.max_tokens)
            exact = (evaluate_kurtosis(model, self._input_ids, "osp_exact", max_tokens=self.max_tokens)
                     if self.exact else None)
        return outlier_log_dict(stats, exact, prefix=PREFIX)

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule, in_loop: bool) -> None:
        step = trainer.global_step
        metrics = self.measure(pl_module, trainer.precision_plugin.forward_context())
        self.history.append({"step": float(step), **metrics})
        # Written to the loggers directly (as LearningRateMonitor does): pl_module.log only reaches
        # them on log_every_n_steps boundaries and is not allowed in on_train_start/on_train_end.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        if in_loop:
            # Also into callback_metrics (checkpoint monitors, summary); identical on every rank.
            pl_module.log_dict(metrics, logger=False, on_step=True, on_epoch=False, sync_dist=False)
        self._check_alarm(trainer, metrics, step, in_loop)

    def _check_alarm(self, trainer: L.Trainer, metrics: dict[str, float], step: int, in_loop: bool) -> None:
        if self.alarm_kurtosis is None:
            return
        offenders = [
            (key.removeprefix(f"{PREFIX}/"), value)
            for key, value in metrics.items()
            if key.startswith((f"{PREFIX}/kurtosis/layer_", f"{PREFIX}/kurtosis_exact/layer_"))
            and value > self.alarm_kurtosis
        ]
        stop = self.alarm_action == "stop" and in_loop
        if stop:
            # A collective on every rank (all measure at the same steps), so all ranks stop together
            # even if a value near the threshold rounds differently on one of them.
            if not trainer.strategy.reduce_boolean_decision(bool(offenders), all=False):
                return
        elif not offenders:
            return
        where = ", ".join(f"{name} = {value:.3g}" for name, value in offenders) or "on another rank"
        message = (f"OutlierMonitor: kurtosis above alarm_kurtosis={self.alarm_kurtosis:g} "
                   f"at step {step}: {where}")
        if self.alarm_step is None:
            self.alarm_step = step
        if stop:
            trainer.should_stop = True
            rank_zero_warn(f"{message}. Stopping the run (callbacks.outliers.alarm_action=stop).")
        else:
            rank_zero_warn(message)

    # Results -----------------------------------------------------------------------------------

    def final_metrics(self) -> dict[str, float]:
        """The last measurement's summary values, for the end-of-run summary."""
        if not self.history:
            return {}
        last = self.history[-1]
        out = {name: last[f"{PREFIX}/{key}"] for name, key in FINAL_KEYS.items() if f"{PREFIX}/{key}" in last}
        out["outliers_step"] = last["step"]
        if self.alarm_step is not None:
            out["kurtosis_alarm_step"] = float(self.alarm_step)
        return out

    def _series(self, name: str, site: str | None = None) -> tuple[list[int], np.ndarray]:
        """Steps and a (n_layers, n_steps) array of the per-layer metric `name` from the history (of the
        linear input `site`, e.g. "mlp.down_proj", for the linear_* metrics)."""
        pattern = f"{PREFIX}/{name}/block_" if site else f"{PREFIX}/{name}/layer_"
        keys = sorted(k for k in self.history[-1]
                      if k.startswith(pattern) and (site is None or k.endswith(site)))
        steps = [int(entry["step"]) for entry in self.history]
        values = np.array([[entry.get(key, math.nan) for entry in self.history] for key in keys])
        return steps, values

    def write_plots(self, out_dir: Path) -> list[Path]:
        """Kurtosis heatmap (layer x step) and max|h| per layer, as PNGs in out_dir."""
        floor = self.history[-1][f"{PREFIX}/kurtosis_floor"]
        steps, kurtosis = self._series("kurtosis")
        paths = [kurtosis_heatmap(steps, kurtosis, floor, Path(out_dir) / "outliers_kurtosis_heatmap.png",
                                  title="OSP kurtosis per layer (context)")]
        steps, exact = self._series("kurtosis_exact")
        if exact.size:  # absent when exact=False (or the last measurement was taken without it)
            paths.append(kurtosis_heatmap(steps, exact, floor,
                                          Path(out_dir) / "outliers_kurtosis_exact_heatmap.png",
                                          title="OSP kurtosis per layer (osp_exact)"))
        steps, peaks = self._series("max_abs")
        paths.append(layer_curves(steps, peaks, Path(out_dir) / "outliers_max_abs.png", ylabel="max |h|",
                                  title="max |h| per layer"))
        steps, down = self._series("linear_max_median", site="mlp.down_proj")
        if down.size:
            paths.append(layer_curves(steps, down, Path(out_dir) / "outliers_down_proj_max_median.png",
                                      ylabel="max / median |x| per token",
                                      title="down_proj input (SwiGLU output) max/median per layer"))
        rank_zero_info(f"OutlierMonitor: plots written to {Path(out_dir)}")
        return paths

    def _log_images(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        tags = {path: f"{PREFIX}/plots/{path.stem.removeprefix(f'{PREFIX}_')}" for path in self.plot_paths}
        for logger in trainer.loggers:
            # Plots are a by-product: a logger that fails to take them must not fail a finished run.
            try:
                if isinstance(logger, WandbLogger):
                    for path in self.plot_paths:
                        logger.log_image(key=tags[path], images=[str(path)], step=step)
                elif isinstance(logger, TensorBoardLogger):
                    from matplotlib.image import imread

                    for path in self.plot_paths:
                        image = imread(path)[..., :3]
                        logger.experiment.add_image(tags[path], image, global_step=step,
                                                    dataformats="HWC")
            except Exception as error:  # noqa: BLE001
                rank_zero_warn(f"OutlierMonitor: could not log plots to {type(logger).__name__}: {error}")
