"""One training job from a composed config: check it, build data, model, callbacks and loggers, fit,
summarise.

`train(cfg)` is what `osp train` runs (osp.cli.train parses the command line and turns faults into one
line). Every rank composes the same config and agrees on one run directory; rank 0 alone writes `.hydra/`,
the job log, metrics, plots, the tokenizer, the export and `summary.json`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from osp.atomic import write_json
from osp.checkpoint_files import LAST, checkpoint_metadata, checkpoint_step, latest_checkpoint, run_dir_of
from osp.conf.resolvers import launch_rank
from osp.data.config import DataConfig
from osp.data.datamodule import PretrainDataModule
from osp.data.pipeline import TokenPipeline
from osp.data.tokenizer import save_tokenizer
from osp.errors import ConfigError, RunDirError
from osp.model import ModelConfig
from osp.precision import AUTO, accelerator_device_type, auto_dtype_name, resolve_precision
from osp.training import rundir
from osp.training.checkpoints import AtomicCheckpointIO, FinalCheckpoint, resolve_resume
from osp.training.loggers import build_loggers
from osp.training.module import LanguageModelModule
from osp.training.preemption import Preempted, Preemption, requeue_slurm_job
from osp.training.run_record import check_resume, run_record
from osp.training.rundir import recover_checkpoints
from osp.training.summary import collect_summary, format_summary
from osp.training.tail_loss import TailLossConfig

# Noise that every run would print and no user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ConfigError(f"callbacks.{name} needs a _target_ (the callback class)")
        callbacks.append(instantiate(node))
    return callbacks


def build_model_config(cfg: DictConfig, vocab_size: int) -> ModelConfig:
    values = OmegaConf.to_container(cfg.model, resolve=True)
    values["vocab_size"] = vocab_size
    return ModelConfig.from_dict(values)


def preflight(cfg: DictConfig) -> None:
    """Check the model, data, optimizer and schedule settings before any data is touched, so a typo fails in a
    second."""
    from osp.optim import OptimConfig

    max_steps = cfg.trainer.get("max_steps")
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise ConfigError("trainer.max_steps must be a positive integer (the schedule spans it), "
                          f"got {max_steps!r}")
    for key in ("val_check_interval", "accumulate_grad_batches"):  # Lightning would divide by zero
        value = cfg.trainer.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and (not number or value <= 0):
            raise ConfigError(f"trainer.{key} must be a positive number, got {value!r}")
    if cfg.trainer.get("strategy") in ("fsdp", "fsdp_cpu_offload"):
        raise ConfigError(f"trainer.strategy={cfg.trainer.strategy!r} is Lightning's FSDP1 wrapper, which "
                          "osp does not support; use trainer=fsdp (FSDP2)")
    build_model_config(cfg, vocab_size=1)
    DataConfig.from_dict(cfg.data)
    TailLossConfig.from_dict(cfg.get("loss"))
    seq_len, max_seq_len = cfg.data.get("seq_len"), cfg.model.get("max_seq_len")
    if isinstance(seq_len, int) and isinstance(max_seq_len, int) and seq_len > max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} exceeds model.max_seq_len={max_seq_len}; lower "
                          "data.seq_len or raise model.max_seq_len")
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no usable CUDA GPU; "
                          "train on the CPU with trainer=cpu")
    try:
        resolve_precision(cfg.trainer.get("precision", AUTO), accelerator)
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        OptimConfig.from_dict(cfg.optim).build_scheduler(dummy, max_steps)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_module(cfg: DictConfig, vocab_size: int,
                 record: dict[str, Any] | None = None) -> LanguageModelModule:
    """The LightningModule of a composed config, for the data's vocabulary size; `record` (see
    osp.training.run_record) travels in its checkpoints."""
    return LanguageModelModule(build_model_config(cfg, vocab_size), cfg.optim, compile=bool(cfg.compile),
                               activation_checkpointing=bool(cfg.get("activation_checkpointing", False)),
                               run_record=record, loss=cfg.get("loss"))


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback],
                  loggers: list[Any]) -> L.Trainer:
    """L.Trainer from `cfg.trainer`; a strategy given as a `_target_` node (trainer=ddp|fsdp) is built."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = kwargs.pop("strategy", "auto")
    if isinstance(strategy, dict):
        strategy = instantiate(strategy)
    kwargs["precision"] = resolve_precision(kwargs.get("precision", AUTO),
                                            str(kwargs.get("accelerator", "auto")))
    return L.Trainer(
        **kwargs,
        strategy=strategy,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
        callbacks=[*callbacks, FinalCheckpoint()],
        logger=loggers,
        gradient_clip_val=cfg.optim.get("grad_clip"),
        enable_model_summary=False,
    )


def unreadable_checkpoint(path: str | Path, err: Exception) -> ConfigError:
    """The one line for a checkpoint to resume from that cannot be read (damaged, cut short, not one)."""
    return ConfigError(f"resume={path}: the checkpoint cannot be read ({type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else 'truncated or not a checkpoint'}); "
                       "resume from another checkpoint of the run (resume=PATH) or start a new run")


def read_resume_checkpoint(ckpt_path: str) -> dict[str, Any]:
    """The metadata of the checkpoint to resume from, or one line saying why it cannot be used."""
    try:
        return checkpoint_metadata(Path(ckpt_path))
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise unreadable_checkpoint(ckpt_path, err) from None


def resolve_for_machine(cfg: DictConfig) -> None:
    """The `auto` settings as this machine runs them, which checkpoints and the summary record: the trainer
    precision, and the Newton-Schulz dtype (bf16 where bf16 is native, else fp32). A checkpoint of a bf16 run
    then resumes as it is wherever bf16 is native, and names the change where it is not."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    with open_dict(cfg):
        cfg.trainer.precision = resolve_precision(cfg.trainer.get("precision", AUTO), accelerator)
        if cfg.optim.get("ns_dtype") == AUTO and cfg.optim.get("name") in ("muon", "root"):
            cfg.optim.ns_dtype = auto_dtype_name(accelerator_device_type(accelerator))


def check_resume_config(cfg: DictConfig, ckpt_path: str) -> None:
    """The config half of `check_resume`, and whether the checkpoint's weights fit the model, before Hydra
    starts: a refused resume must not replace the run's .hydra/ record with the refused settings. The data
    fingerprints are compared in `train`."""
    resumed = read_resume_checkpoint(ckpt_path)
    vocab_size = (resumed.get("osp", {}).get("model_config") or {}).get("vocab_size")
    if isinstance(vocab_size, int):  # the vocabulary is the data's; the checkpoint's run knew it
        with torch.device("meta"):
            check_shapes(build_module(cfg, vocab_size), resumed, ckpt_path)
    stored = resumed.get("osp", {}).get("run")
    if not stored:
        return
    cfg = copy.deepcopy(cfg)
    resolve_for_machine(cfg)  # as `train` records it
    record = run_record(cfg, stored.get("source_fingerprint"), stored.get("tokenizer_fingerprint"))
    check_resume(stored, record, list(cfg.get("resume_allow") or []), ckpt_path,
                 str(Path(cfg.run_dir) / "tokenizer"))


def check_shapes(module: LanguageModelModule, resumed: dict[str, Any], ckpt_path: str) -> None:
    """Refuse a checkpoint whose weights do not fit the model before anything of the run is written (a
    resume's CSV logger trims metrics.csv to the checkpoint's step as it starts)."""
    own = module.state_dict()
    stored = resumed.get("state_dict") or {}  # empty for a distributed checkpoint's meta.pt
    mismatched = [f"size mismatch for {key}: {tuple(value.shape)} in the checkpoint, {tuple(own[key].shape)} "
                  "in this model" for key, value in stored.items()
                  if key in own and torch.is_tensor(value) and value.shape != own[key].shape]
    if stored:  # another depth or block choice: weights the model lacks, or lacks in the checkpoint
        mismatched += [f"{key} is in the checkpoint, not in this model"
                       for key in sorted(set(stored) - set(own))]
        mismatched += [f"{key} is in this model, not in the checkpoint"
                       for key in sorted(set(own) - set(stored))]
    if mismatched:
        more = f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""
        raise ConfigError(f"resume from {ckpt_path}: the checkpoint does not fit this model "
                          f"({mismatched[0]}{more}); resume with the model settings it was trained with, or "
                          "start a new run")


class RunFinished(Exception):
    """The run asked to start has already reached its max_steps and written its summary: nothing to do."""

    def __init__(self, run_dir: Path, step: int, summary: dict[str, Any]) -> None:
        self.run_dir, self.step, self.summary = run_dir, step, summary
        super().__init__(f"run {run_dir} finished at step {step} (its summary: {run_dir / 'summary.json'}); "
                         "nothing changed. To train it further, raise trainer.max_steps and add "
                         "resume_allow=[trainer.max_steps]")


def starting_point(cfg: DictConfig) -> str | None:
    """The checkpoint this start of the run resumes from (None: a new run at step 0), after the checks that
    keep a run dir intact: a run name that stays under runs_root and outside other runs, no new run over an
    old one, no resume from an older checkpoint of this run over its newer ones (branch into a new run
    instead), and `RunFinished` for a finished run started again (a requeued job, a relaunch)."""
    run_dir = Path(cfg.run_dir)
    rundir.check_placement(str(cfg.run_name), Path(cfg.runs_root), run_dir)
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    if ckpt_path is None:
        if launch_rank() == 0:  # the others start while rank 0 already writes into the new run dir
            rundir.check_fresh(run_dir, str(cfg.run_name), cfg.resume)
        return None
    checkpoint = Path(ckpt_path)
    step = checkpoint_step_or_fail(checkpoint)
    if run_dir_of(checkpoint).resolve() == run_dir.resolve():
        newest = latest_checkpoint(run_dir / "checkpoints")
        newest_step = checkpoint_step(newest) if newest is not None else step
        if newest_step > step:
            raise RunDirError(f"resume={ckpt_path} is step {step} of this run, which has checkpoints up to "
                              f"step {newest_step}: continuing from it would write over them and over the "
                              f"run's metrics and summary. Continue from the newest with resume=auto, or "
                              f"branch into a new run: run_name=<new name> resume={ckpt_path}")
    summary = read_summary(run_dir)
    if step >= int(cfg.trainer.max_steps) and summary.get("status") == "finished":
        raise RunFinished(run_dir, step, summary)
    return ckpt_path


def checkpoint_step_or_fail(path: Path) -> int:
    """The checkpoint's global step, or one line saying why it cannot be used."""
    try:
        return checkpoint_step(path)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise unreadable_checkpoint(path, err) from None


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json ({} when there is none or it cannot be read)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def late_signal(trainer: L.Trainer) -> Preempted | None:
    """The stop a preemption signal asks for when it arrived after the last step, while the callbacks did the
    end-of-training work (final evaluations, export); last.ckpt already holds the final step
    (FinalCheckpoint), so the run resumes into that work alone."""
    for callback in trainer.callbacks:
        if isinstance(callback, Preemption) and callback.received is not None:
            last = Path(checkpoint_dir(trainer)) / LAST
            return Preempted(callback.received, trainer.global_step, last)
    return None


def checkpoint_dir(trainer: L.Trainer) -> str:
    keeper = next((cb for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)), None)
    return str(keeper.dirpath) if keeper is not None else str(Path(trainer.default_root_dir) / "checkpoints")


class _ConsoleCopy(io.TextIOBase):
    """stdout, with every complete line also appended to a log file (progress-bar redraws, which start with a
    carriage return, stay on the terminal only)."""

    def __init__(self, stream: Any, log: Any) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        if "\r" not in text:
            self.log.write(text)
            self.log.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


@contextlib.contextmanager
def console_copy(path: Path) -> Iterator[None]:
    """While training runs, what it prints (the optimizer table, notices, the summary) also goes to the run's
    train.log, beside the log records Hydra writes there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        previous = sys.stdout
        sys.stdout = _ConsoleCopy(previous, log)
        try:
            yield
        finally:
            sys.stdout = previous


def busy_cores_notice(world_size: int = 1, load: float | None = None, cores: int | None = None,
                      threads: int | None = None) -> str | None:
    """One line when other processes hold this machine's cores: a CPU run whose threads share cores with other
    work runs several times slower than its usual speed (OpenMP threads wait for each other), e.g. an hour
    instead of minutes. None when the cores are free enough (or the run is on a GPU)."""
    if torch.cuda.is_available():
        return None
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1)
    threads = (threads or torch.get_num_threads()) * world_size
    load = os.getloadavg()[0] if load is None and hasattr(os, "getloadavg") else (load or 0.0)
    free = cores - load
    if load < 1.0 or threads <= free + 0.5:
        return None
    suggestion = max(1, int(free)) if free >= 1 else 1
    return (f"osp: other processes keep this machine busy (load {load:.1f} on {cores} cores) and this run "
            f"wants {threads} threads: expect steps several times slower than on free cores. Stop the other "
            f"jobs, or run with OMP_NUM_THREADS={suggestion}")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by a composed config; returns the end-of-run summary.

    Raises `Preempted` when a signal stopped the run (after its checkpoint and a summary were saved), and
    `RunFinished` (before anything is written) when the run had already finished.
    """
    run_dir = Path(cfg.run_dir)
    preflight(cfg)
    resolve_for_machine(cfg)
    for line in recover_checkpoints(run_dir / "checkpoints") if launch_rank() == 0 else []:
        print(f"osp: {line}")
    ckpt_path = starting_point(cfg)
    with console_copy(run_dir / "train.log") if launch_rank() == 0 else contextlib.nullcontext():
        return fit(cfg, run_dir, ckpt_path)


def fit(cfg: DictConfig, run_dir: Path, ckpt_path: str | None) -> dict[str, Any]:
    """The run itself, from data, model and trainer to the summary (`train` after its checks)."""
    resumed = read_resume_checkpoint(ckpt_path) if ckpt_path else None
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = PretrainDataModule(TokenPipeline(DataConfig.from_dict(cfg.data)))
    data = datamodule.pipeline
    record = run_record(cfg, data.source_fingerprint(), data.tokenizer_fingerprint())
    accepted = []
    if resumed is not None:
        accepted = check_resume(resumed.get("osp", {}).get("run"), record,
                                list(cfg.get("resume_allow") or []), ckpt_path, str(run_dir / "tokenizer"))
    module = build_module(cfg, data.vocab_size, record)
    if resumed is not None:
        check_shapes(module, resumed, ckpt_path)
    trainer = build_trainer(cfg, run_dir, build_callbacks(cfg), build_loggers(cfg, run_dir, resumed))
    if trainer.is_global_zero:
        # Beside the checkpoints, so export and eval find the tokenizer from the run dir alone.
        save_tokenizer(data.tokenizer, run_dir / "tokenizer", model_max_length=int(cfg.model.max_seq_len))
        n = module.model.num_params()
        print(f"osp: run {cfg.run_name} -> {run_dir}  |  model {n / 1e6:.2f}M params "
              f"({module.model.num_params(exclude_embedding=True) / 1e6:.2f}M non-embedding)"
              f"  |  {cfg.trainer.precision}"
              + (f"  |  {trainer.world_size} ranks" if trainer.world_size > 1 else "")
              + (f"  |  resuming from {ckpt_path} (step {resumed['global_step']})" if resumed else ""))
        for line in accepted:
            print(f"osp: resume accepts {line}")
        if cfg.resume == "auto" and ckpt_path is None:
            print(f"osp: resume=auto: no checkpoint in {run_dir / 'checkpoints'} yet; starting at step 0")
        notice = busy_cores_notice(trainer.world_size)
        if notice:
            print(notice)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            if ckpt_path:  # the run's own checkpoints are expected there
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        late = late_signal(trainer)
        # during the end-of-training work (final evaluations, export): a stop all the same
        if late is not None:
            raise late
    except Preempted as stop:
        if trainer.is_global_zero:
            summary = collect_summary(cfg, trainer, module, time.perf_counter() - started, status="stopped")
            write_json(run_dir / "summary.json", summary)
        if stop.requeue and trainer.is_global_zero:  # last: SLURM ends the job as soon as it is requeued
            requeue_slurm_job()
        raise
    if ("val/loss" not in trainer.callback_metrics
            or trainer.global_step % int(cfg.trainer.val_check_interval)):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    summary = collect_summary(cfg, trainer, module, time.perf_counter() - started, status="finished")
    if trainer.is_global_zero:
        write_json(run_dir / "summary.json", summary)
        if cfg.summary:
            print(format_summary(summary))
    return summary
