"""Loggers of a run (CSV always; wandb and TensorBoard when enabled), continued across resumes.

Lightning's CSVLogger deletes `metrics.csv` when its folder is not empty, which would erase the curve
of every segment before a resume; `ResumableCSVLogger` keeps it. The wandb run id is derived from the
run name, so a resumed (or SLURM-requeued) run keeps logging into the same wandb run.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from osp.atomic import atomic_path
from osp.training.logger_config import LoggerConfig


class ContinuedExperimentWriter(ExperimentWriter):
    """ExperimentWriter that continues the `metrics.csv` of the run being resumed.

    Kept: every row of a step before the checkpoint's step, and the rows of that step logged before the
    checkpoint was written (the first `resume_rows` rows of the file; e.g. an outlier measurement at
    that step). Dropped: rows logged after the checkpoint, which the resumed run writes again.
    """

    def __init__(self, log_dir: str, resume_step: int | None = None, resume_rows: int | None = None) -> None:
        self.resume_step, self.resume_rows = resume_step, resume_rows
        self.rows_on_disk = 0
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if self.resume_step is None:  # a fresh run replaces what an earlier run of this name left
            super()._check_log_dir_exists()
            return
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            fieldnames = list(reader.fieldnames or [])
            rows = list(reader)
        written_before = len(rows) if self.resume_rows is None else self.resume_rows
        kept = [row for i, row in enumerate(rows) if row.get("step") not in (None, "")
                and (int(float(row["step"])) < self.resume_step
                     or int(float(row["step"])) == self.resume_step and i < written_before)]
        self.metrics_keys = sorted(fieldnames)
        with atomic_path(path) as staging, staging.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        self.rows_on_disk = len(kept)

    def save(self) -> None:
        pending = len(self.metrics)
        super().save()
        self.rows_on_disk += pending


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that continues `metrics.csv` of a resumed run and flushes it with every checkpoint
    (so a crash loses no row that the resumed run will not write again)."""

    def __init__(self, *args: Any, resume_step: int | None = None, resume_rows: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step, self.resume_rows = resume_step, resume_rows

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuedExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedExperimentWriter(self.log_dir, self.resume_step, self.resume_rows)
        return self._experiment

    @property
    def rows_logged(self) -> int | None:
        """Rows logged so far, written or pending (None on ranks that do not log). Checkpoints store it."""
        writer = self._experiment
        if not isinstance(writer, ContinuedExperimentWriter):
            return None
        return writer.rows_on_disk + len(writer.metrics)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.save()


def wandb_mode(requested: str | None) -> str:
    """online when a key is configured, offline otherwise; WANDB_MODE in the environment wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested:
        return requested
    netrc = Path.home() / ".netrc"
    has_key = (bool(os.environ.get("WANDB_API_KEY"))
               or (netrc.exists() and "api.wandb.ai" in netrc.read_text()))
    return "online" if has_key else "offline"


def wandb_run_id(run_name: str) -> str:
    """A wandb run id from the run name (wandb ids allow letters, digits, '-' and '_')."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:128]


def build_loggers(cfg: DictConfig, run_dir: Path, resume: dict[str, Any] | None = None) -> list[Any]:
    """The loggers `cfg.logger` asks for; `resume`: metadata of the checkpoint resumed from (or None)."""
    settings = LoggerConfig.from_dict(cfg.get("logger"))
    loggers: list[Any] = []
    if settings.csv:
        step = None if resume is None else int(resume["global_step"])
        rows = None if resume is None else (resume.get("osp") or {}).get("csv_rows")
        loggers.append(ResumableCSVLogger(save_dir=str(run_dir), name="", version="csv", resume_step=step,
                                          resume_rows=rows))
    if settings.wandb.enabled:
        mode = wandb_mode(settings.wandb.mode)
        if mode != "disabled":
            from lightning.pytorch.loggers import WandbLogger

            # The same id on every start of the run: a resumed or requeued run continues its wandb run.
            loggers.append(WandbLogger(project=settings.wandb.project, entity=settings.wandb.entity,
                                       name=str(cfg.run_name), id=wandb_run_id(str(cfg.run_name)),
                                       resume="allow", save_dir=str(run_dir), mode=mode,
                                       config=OmegaConf.to_container(cfg, resolve=True)))
    if settings.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard"))
    return loggers
