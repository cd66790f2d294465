"""Hydra entry point: compose the config, build data, model, callbacks and loggers, fit, summarise.

`osp train [overrides]` and `python -m osp.train [overrides]` (also under torchrun, one process per
device) both land in `main`. Every rank composes the same config and agrees on one run directory;
rank 0 alone writes `.hydra/`, the job log, metrics, plots, the tokenizer, the export and `summary.json`.
"""

from __future__ import annotations

import copy
import errno
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from osp.conf import CONFIG_DIR, TRAIN_CONFIG, compose
from osp.conf.resolvers import launch_rank, register_resolvers, run_id
from osp.data.cache import write_json_atomic
from osp.data.tokenizer import save_tokenizer
from osp.model import ConfigError, ModelConfig
from osp.precision import AUTO, resolve_precision
from osp.training import rundir
from osp.training.checkpoints import AtomicCheckpointIO, checkpoint_metadata, resolve_resume
from osp.training.loggers import build_loggers
from osp.training.module import LanguageModelModule
from osp.training.preemption import Preempted, requeue_slurm_job
from osp.training.rundir import RunLock, recover_checkpoints
from osp.training.run_record import check_resume, run_record

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
    """Check the optimizer and schedule settings before any data is touched, so a typo fails in a second."""
    from osp.optim import build_scheduler
    from osp.optim.config import optim_config

    max_steps = cfg.trainer.get("max_steps")
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise ConfigError(f"trainer.max_steps must be a positive integer (the schedule spans it), got {max_steps!r}")
    for key in ("val_check_interval", "accumulate_grad_batches"):  # Lightning would divide by zero
        value = cfg.trainer.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and (not number or value <= 0):
            raise ConfigError(f"trainer.{key} must be a positive number, got {value!r}")
    if cfg.trainer.get("strategy") in ("fsdp", "fsdp_cpu_offload"):
        raise ConfigError(f"trainer.strategy={cfg.trainer.strategy!r} is Lightning's FSDP1 wrapper, which "
                          "osp does not support; use trainer=fsdp (FSDP2)")
    build_model_config(cfg, vocab_size=1)
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
        optim_config(cfg.optim)
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        build_scheduler(dummy, cfg.optim, max_steps)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_module(cfg: DictConfig, vocab_size: int, record: dict[str, Any] | None = None) -> LanguageModelModule:
    """The LightningModule of a composed config, for the data's vocabulary size; `record` (see
    osp.training.run_record) travels in its checkpoints."""
    return LanguageModelModule(build_model_config(cfg, vocab_size), cfg.optim, compile=bool(cfg.compile),
                               activation_checkpointing=bool(cfg.get("activation_checkpointing", False)),
                               run_record=record)


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback],
                  loggers: list[Any]) -> L.Trainer:
    """L.Trainer from `cfg.trainer`; a strategy given as a `_target_` node (trainer=ddp|fsdp) is built."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = kwargs.pop("strategy", "auto")
    if isinstance(strategy, dict):
        strategy = instantiate(strategy)
    kwargs["precision"] = resolve_precision(kwargs.get("precision", AUTO), str(kwargs.get("accelerator", "auto")))
    return L.Trainer(
        **kwargs,
        strategy=strategy,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
        callbacks=callbacks,
        logger=loggers,
        gradient_clip_val=cfg.optim.get("grad_clip"),
        enable_model_summary=False,
    )


def read_resume_checkpoint(ckpt_path: str) -> dict[str, Any]:
    """The metadata of the checkpoint to resume from, or one line saying why it cannot be used."""
    try:
        return checkpoint_metadata(Path(ckpt_path))
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise ConfigError(f"resume={ckpt_path}: the checkpoint cannot be read ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'truncated or not a checkpoint'}); "
                          "resume from another checkpoint of the run (resume=PATH) or start a new run") from None


def check_resume_config(cfg: DictConfig, ckpt_path: str) -> None:
    """The config half of `check_resume`, before Hydra starts: a refused resume must not replace the run's
    .hydra/ record with the refused settings. The data fingerprints are compared in `train`."""
    stored = read_resume_checkpoint(ckpt_path).get("osp", {}).get("run")
    if not stored:
        return
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):  # as `train` records it
        cfg.trainer.precision = resolve_precision(cfg.trainer.get("precision", AUTO),
                                                  str(cfg.trainer.get("accelerator", "auto")))
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
    if mismatched:
        more = f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""
        raise ConfigError(f"resume from {ckpt_path}: the checkpoint does not fit this model "
                          f"({mismatched[0]}{more}); resume with the model settings it was trained with, or "
                          "start a new run")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by a composed config; returns the end-of-run summary.

    Raises `Preempted` when a signal stopped the run (after its checkpoint and a summary were saved).
    """
    run_dir = Path(cfg.run_dir)
    preflight(cfg)
    with open_dict(cfg):  # the precision this machine runs, as recorded in checkpoints and the summary
        cfg.trainer.precision = resolve_precision(cfg.trainer.get("precision", AUTO),
                                                  str(cfg.trainer.get("accelerator", "auto")))
    for line in recover_checkpoints(run_dir / "checkpoints") if launch_rank() == 0 else []:
        print(f"osp: {line}")
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    if ckpt_path is None and launch_rank() == 0:
        rundir.check_fresh(run_dir, str(cfg.run_name), cfg.resume)
    resumed = read_resume_checkpoint(ckpt_path) if ckpt_path else None
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    record = run_record(cfg, datamodule.source_fingerprint(), datamodule.tokenizer_fingerprint())
    accepted = []
    if resumed is not None:
        accepted = check_resume(resumed.get("osp", {}).get("run"), record, list(cfg.get("resume_allow") or []),
                                ckpt_path, str(run_dir / "tokenizer"))
    module = build_module(cfg, datamodule.vocab_size, record)
    if resumed is not None:
        check_shapes(module, resumed, ckpt_path)
    trainer = build_trainer(cfg, run_dir, build_callbacks(cfg), build_loggers(cfg, run_dir, resumed))
    if trainer.is_global_zero:
        # Beside the checkpoints, so export and eval find the tokenizer from the run dir alone.
        save_tokenizer(datamodule.tokenizer, run_dir / "tokenizer", model_max_length=int(cfg.model.max_seq_len))
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
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            if ckpt_path:  # the run's own checkpoints are expected there
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except Preempted as stop:
        if trainer.is_global_zero:
            summary = collect_summary(cfg, trainer, module, time.perf_counter() - started, status="stopped")
            write_json_atomic(run_dir / "summary.json", summary)
        if stop.requeue and trainer.is_global_zero:  # last: SLURM ends the job as soon as it is requeued
            requeue_slurm_job()
        raise
    if "val/loss" not in trainer.callback_metrics or trainer.global_step % int(cfg.trainer.val_check_interval):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    summary = collect_summary(cfg, trainer, module, time.perf_counter() - started, status="finished")
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "summary.json", summary)
        if cfg.summary:
            print(format_summary(summary))
    return summary


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or Infinity: a non-finite metric is recorded as null ("n/a" when printed)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def collect_summary(cfg: DictConfig, trainer: L.Trainer, module: LanguageModelModule, wall: float,
                    status: str) -> dict[str, Any]:
    """The end-of-run record: status (finished | stopped), losses, outlier and W4A4 numbers, where things are."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    val_loss = finite_or_none(metrics.get("val/loss"))
    summary: dict[str, Any] = {
        "status": status,
        "run_name": str(cfg.run_name),
        "run_dir": str(Path(cfg.run_dir).resolve()),
        "recipe": str(cfg.name),
        "steps": int(trainer.global_step),
        "max_steps": int(cfg.trainer.max_steps),
        "tokens_seen": int(module.tokens_seen),
        "wall_seconds": wall,
        "precision": str(cfg.trainer.precision),
        # The logged mean over ranks is gone once the end-of-run validation resets the metrics; then
        # the last step's loss on this rank.
        "train_loss": metrics.get("train/loss",
                                  None if module.last_loss is None else float(module.last_loss)),
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)) if val_loss is not None else None,
        "ln_vocab": math.log(module.model_cfg.vocab_size),
        "d_model": module.model_cfg.d_model,
        "optimizer": str(cfg.optim.name),
        "norm": module.model_cfg.norm,
        "emb_proj": module.model_cfg.emb_proj,
        "params": module.model.num_params(),
        "world_size": trainer.world_size,
    }
    for callback in trainer.callbacks:
        if hasattr(callback, "final_metrics"):
            summary.update(callback.final_metrics())
    ckpt = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    summary["checkpoint"] = str(ckpt.resolve()) if ckpt.exists() else None
    summary["logs"] = str((Path(cfg.run_dir) / "csv" / "metrics.csv").resolve())
    return {key: finite_or_none(value) for key, value in summary.items()}


def format_summary(s: dict[str, Any]) -> str:
    def fmt(key: str, spec: str = ".4g") -> str:
        value = s.get(key)
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    lines = [
        f"run            {s['run_name']}  ({s['steps']} steps, {s['wall_seconds']:.0f} s)",
        f"tokens seen    {s['tokens_seen']:,}   ({fmt('tokens_per_s', ',.0f')} tokens/s)",
        f"train loss     {fmt('train_loss')}",
        f"val loss       {fmt('val_loss')}   (ln vocab = {s['ln_vocab']:.2f})",
        f"val ppl        {fmt('val_ppl', '.2f')}",
    ]
    if s.get("skipped_steps"):
        lines.append(f"skipped steps  {s['skipped_steps']} (non-finite loss or gradient)")
    if "kurtosis" in s:
        lines.append(f"kurtosis       {fmt('kurtosis')} = {fmt('kurtosis_floor_ratio', '.3g')}x the Gaussian floor "
                     f"{fmt('kurtosis_floor', '.3f')} at d={s['d_model']}   (osp_exact {fmt('kurtosis_exact')})")
    if "max_abs" in s:
        lines.append(f"max |h|        {fmt('max_abs', '.1f')}")
    if "ppl_w4a4" in s:
        lines.append(f"W4A4 ppl       {fmt('ppl_w4a4', '.2f')}   (fp {fmt('ppl_fp', '.2f')}, "
                     f"ratio {fmt('quant_ratio', '.3f')})")
    lines += outlier_story(s)
    lines.append(f"checkpoint     {s['checkpoint'] or 'none'}")
    if s.get("export_dir"):
        lines.append(f"export         {s['export_dir']}")
    lines.append(f"logs           {s['logs']}")
    lines.append(f"summary        {Path(s['run_dir']) / 'summary.json'}")
    width = max(len(line) for line in lines)
    bar = "=" * width
    return "\n".join([bar, "osp summary".center(width), bar, *lines, bar])


# Kurtosis as a multiple of the Gaussian floor (what Gaussian activations of this width give): up to
# OUTLIER_FREE the activations look Gaussian (OSP's 1.4B model: 1x); beyond HEAVY_OUTLIERS they have the
# heavy tails that break 4-bit activations (OSP's AdamW 1.4B model: 4.4e4x; the tiny AdamW demo: ~70x).
OUTLIER_FREE, HEAVY_OUTLIERS = 3.0, 10.0


def outlier_story(s: dict[str, Any]) -> list[str]:
    """The verdict on the run's activations and the command that trains the other arm of the A/B."""
    ratio = s.get("kurtosis_floor_ratio")
    if ratio is None:
        return []
    if ratio <= OUTLIER_FREE:
        verdict = f"outlier-free: activations are Gaussian-like (kurtosis within {OUTLIER_FREE:g}x the floor)"
    elif ratio < HEAVY_OUTLIERS:
        verdict = f"some outliers: kurtosis {ratio:.3g}x the floor"
    else:
        verdict = (f"heavy outliers: kurtosis {ratio:.3g}x the floor, max |h| {s.get('max_abs') or 0:.0f} "
                   "(at 1B scale such tails wreck 4-bit activations)")
    lines = [f"verdict        {verdict}"]
    baseline = s.get("optimizer") == "adamw" and s.get("norm") == "rms" and not s.get("emb_proj")
    other = "osp" if baseline else "tiny"
    if s.get("recipe") in ("tiny", "osp"):  # the demo A/B: the other arm, same data, budget and lr
        what = "the outlier-safe arm (Muon + SSNorm + EmbProj)" if baseline else "the AdamW baseline arm"
        lines.append(f"A/B            {what}: osp train recipe={other}")
        lines.append(f"               then: osp report {s['run_dir']} {Path(s['run_dir']).parent / other}-*")
    return lines


def fault_message(err: BaseException) -> str | None:
    """One line for an environment fault (disk full, read-only or missing permissions), else None."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device writing {err.filename or 'a file'}; free space (or move "
                "runs_root / OSP_CACHE_DIR) and continue with resume=auto: earlier checkpoints are intact")
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return (f"cannot write {err.filename or 'a file'} ({os.strerror(err.errno)}); choose a writable "
                "runs_root=PATH (or OSP_CACHE_DIR for the data cache)")
    if isinstance(err, RuntimeError) and "size mismatch" in str(err):
        first = next(line.strip() for line in str(err).splitlines() if "size mismatch" in line)
        return (f"the checkpoint does not fit this model ({first}); resume with the model settings it was "
                "trained with, or start a new run")
    return None


def one_line(err: BaseException) -> str:
    """An error's message on one line (Hydra lists the available options on lines of their own)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()).replace(": ", ": ", 1)


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (Lightning and Hydra wrap the one that names the fault)."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return err


_LAUNCH_ARGV: list[str] = []  # the command line as started (`osp train ...`), set by main


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=TRAIN_CONFIG)
def _hydra_main(cfg: DictConfig) -> None:
    if _LAUNCH_ARGV:
        sys.argv = list(_LAUNCH_ARGV)  # what Lightning re-runs for the other devices' processes
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from osp.data.sources import DataError
    from osp.training.callbacks.stability import NonFiniteLossError

    try:
        train(cfg)
    except (ConfigError, DataError, FileNotFoundError, NonFiniteLossError) as err:
        # Problems with the user's input get one clear line, not a traceback.
        print(f"osp train: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except Preempted as stop:
        # Neither success (a scheduler must not mark the job done) nor a crash: one line, no traceback.
        if launch_rank() == 0:
            print(f"osp train: {stop.describe(str(cfg.run_name))}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except MisconfigurationException as err:  # a trainer setting Lightning refuses
        print(f"osp train: error: {one_line(err)} (check the trainer.* settings)", file=sys.stderr)
        raise SystemExit(1) from None
    except (OSError, RuntimeError) as err:
        message = fault_message(root_cause(err)) or fault_message(err)
        if message is None:
            raise
        print(f"osp train: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def start_checks(args: list[str]) -> RunLock | None:
    """Before Hydra creates anything: compose, check the settings and the run dir, lock it (rank 0).

    A config that fails here leaves no run folder behind, and a second run with the name of a live one
    stops before it writes a byte there (Hydra would overwrite the first run's .hydra/ at start).
    Multirun sweeps (-m) compose per job, so they are checked inside each job instead.
    """
    if launch_rank() > 0 or any(a in ("-m", "--multirun") or a.startswith("-") for a in args):
        return None
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(args)
        preflight(cfg)
        run_dir = Path(cfg.run_dir)
        ckpt_path = resolve_resume(cfg.resume, run_dir)
        if ckpt_path is None:
            rundir.check_fresh(run_dir, str(cfg.run_name), cfg.resume)
        else:
            check_resume_config(cfg, ckpt_path)
        lock = RunLock(run_dir)
        lock.acquire()
    except (HydraException, OmegaConfBaseException, ConfigError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"osp train: error: {one_line(err)}") from None
    except OSError as err:
        raise SystemExit(f"osp train: error: {fault_message(err) or err}") from None
    return lock


def main(argv: list[str] | None = None) -> None:
    """Run training with Hydra overrides (argv defaults to sys.argv[1:])."""
    register_resolvers()
    # Pinned for this process and inherited by the ones Lightning starts for the other devices.
    os.environ["OSP_RUN_ID"] = run_id()
    args = list(sys.argv[1:] if argv is None else argv)
    lock = start_checks(args)
    if launch_rank() > 0:
        # Only rank 0 writes .hydra/ and the job log; the other ranks log to their console.
        args += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    # Hydra reads its overrides from sys.argv; _hydra_main puts the real command line back for Lightning,
    # which starts the processes of other devices (trainer.devices > 1 without torchrun) by re-running it.
    _LAUNCH_ARGV[:] = sys.argv
    sys.argv = [sys.argv[0], *args]
    try:
        _hydra_main()
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":  # python -m osp.training.train (Lightning re-runs it so, see main)
    main()
