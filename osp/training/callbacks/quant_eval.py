"""QuantEval: W4A4 perplexity of the current weights, logged while training runs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as L
import torch

from osp.errors import ConfigError
from osp.quant import QuantConfig, nll_stats, quantized


def metric_suffix(preset: str) -> str:
    """`quant/ppl_<suffix>` for an extra preset: "w4a16" -> "w4a16", "w4a4kv4+had" -> "w4a4kv4_had"."""
    return QuantConfig.from_preset(preset).name.replace("+", "_")


class QuantEval(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end of training) evaluate a fixed held-out set in
    full precision and under the W4A4 view, and log `quant/ppl_fp`, `quant/ppl_w4a4`, `quant/ratio`
    (= ppl_w4a4 / ppl_fp) and `quant/ppl_<preset>` for each extra preset (e.g. w4a16, w16a4kv4, w4a4kv4+had).

    The held-out blocks come from `trainer.datamodule.heldout_blocks(num_blocks)` once. Under DDP/FSDP each
    rank evaluates a disjoint slice and the NLL sums and token counts are all-reduced, so every rank ends
    with the same numbers; every rank runs the same number of forward passes (sharded models need that).
    Metrics go straight to the loggers at the current step (not through `self.log`, whose
    `log_every_n_steps` throttling could drop them) and into `trainer.callback_metrics`.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_blocks: int = 16,
        batch_size: int = 4,
        preset: str = "w4a4kv4",
        extra_presets: Sequence[str] = (),
        at_train_end: bool = True,
        backend: str | None = None,
    ) -> None:
        if every_n_steps <= 0 or num_blocks <= 0 or batch_size <= 0:
            raise ConfigError("QuantEval: every_n_steps, num_blocks and batch_size must be positive")
        self.every_n_steps = every_n_steps
        self.num_blocks = num_blocks
        self.batch_size = batch_size
        self.at_train_end = at_train_end
        self.backend = backend
        # Metric suffix -> config; validated here so a typo fails at startup, not after N steps.
        self.presets: dict[str, QuantConfig] = {}
        for suffix, name in [("w4a4", preset), *((metric_suffix(p), p) for p in extra_presets)]:
            cfg = QuantConfig.from_preset(name)
            if cfg.needs_calibration:
                raise ConfigError(f"QuantEval: {name!r} needs calibration data (GPTQ weights or static "
                                  "activation scales); evaluate it offline: osp eval RUN_DIR --quant " + name)
            if suffix in self.presets:
                raise ConfigError(f"QuantEval: preset {name!r} would log under quant/ppl_{suffix} twice")
            self.presets[suffix] = cfg
        self._blocks: torch.Tensor | None = None
        self._last_step = -1
        self.last: dict[str, float] = {}

    def _heldout(self, trainer: L.Trainer) -> torch.Tensor:
        if self._blocks is None:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "heldout_blocks"):
                raise RuntimeError("QuantEval needs trainer.datamodule.heldout_blocks(n)")
            self._blocks = datamodule.heldout_blocks(self.num_blocks).cpu()
        return self._blocks

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Run the evaluation on all ranks (collectively) and log; returns the metrics."""
        self._last_step = trainer.global_step
        model = pl_module.model
        blocks = self._heldout(trainer)
        world, rank = trainer.world_size, trainer.global_rank
        per_rank = math.ceil(blocks.shape[0] / world)
        mine = blocks[rank::world]
        num_valid = mine.shape[0]
        if num_valid < per_rank:  # pad with a block that is run but not counted
            mine = torch.cat([mine, blocks[:1].expand(per_rank - num_valid, -1)])

        sums: list[tuple[float, int]] = []
        with trainer.precision_plugin.forward_context():
            sums.append(nll_stats(model, mine, self.batch_size, num_valid))
            for cfg in self.presets.values():
                with quantized(model, cfg, backend=self.backend):
                    sums.append(nll_stats(model, mine, self.batch_size, num_valid))
        totals = torch.tensor(sums, dtype=torch.float64, device=pl_module.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")

        ppl = [math.exp(nll / count) for nll, count in totals.tolist()]
        metrics = {"quant/ppl_fp": ppl[0]}
        metrics.update({f"quant/ppl_{suffix}": value for suffix, value in zip(self.presets, ppl[1:])})
        metrics["quant/ratio"] = metrics["quant/ppl_w4a4"] / metrics["quant/ppl_fp"]
        self.last = metrics
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        return metrics

    def final_metrics(self) -> dict[str, float | str]:
        """The last evaluation's metrics (empty before the first) for the end-of-run summary:
        ppl_fp, ppl_w4a4, quant_ratio, ppl_<preset> for each extra preset, and quant_preset (the preset
        that ppl_w4a4 measures, e.g. w4a4kv4)."""
        if not self.last:
            return {}
        renamed = {"quant/ratio": "quant_ratio"}
        metrics: dict[str, float | str] = {renamed.get(k, k.removeprefix("quant/")): v
                                           for k, v in self.last.items()}
        return {**metrics, "quant_preset": self.presets["w4a4"].name}

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = dict(state_dict.get("last", {}))
        self._last_step = int(state_dict.get("last_step", -1))
