"""Hydra entry point: compose the config, build data, model, callbacks and loggers, fit, summarise.

`osp train [overrides]` and `python -m osp.train [overrides]` (also under torchrun, one process per
device) both land in `main`. Every rank composes the same config and agrees on one run directory;
rank 0 alone writes `.hydra/`, the job log, metrics, plots, the tokenizer, the export and `summary.json`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from osp.model import ConfigError, ModelConfig
from osp.training.checkpoints import AtomicCheckpointIO, checkpoint_metadata, resolve_resume
from osp.training.loggers import build_loggers, wandb_mode  # noqa: F401 - wandb_mode: imported from here too
from osp.training.module import LanguageModelModule
from osp.training.preemption import Preempted, requeue_slurm_job

# Noise that every run would print and no user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
_RUN_ID = time.strftime("%Y%m%d-%H%M%S")


def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun: RANK; srun: SLURM_PROCID; Lightning's
    own launcher: LOCAL_RANK), readable before any process group exists."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def run_id() -> str:
    """An id that every rank of one job agrees on.

    In order: the SLURM job (+ array task), the torchrun rendezvous id, OSP_RUN_ID (set by the parent osp
    process for the processes Lightning starts, or by a launcher), a timestamp. Under torchrun without
    --rdzv-id (whose run id is the literal "none") rank 0's timestamp reaches the other ranks through
    torchrun's own store.
    """
    if os.environ.get("SLURM_JOB_ID"):
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm{os.environ['SLURM_JOB_ID']}" + (f"_{task}" if task else "")
    if os.environ.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):
        return os.environ["TORCHELASTIC_RUN_ID"][:12]
    if os.environ.get("OSP_RUN_ID"):
        return os.environ["OSP_RUN_ID"]
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if agent_store and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return rank0_value("osp/run_id", _RUN_ID)
    return _RUN_ID


def rank0_value(key: str, value: str) -> str:
    """Rank 0's `value` on every rank, through the key-value store of torchrun's agent (MASTER_ADDR/PORT).

    That store exists before Hydra composes the config, long before Lightning sets up the process group.
    The first value set wins, so workers that torchrun restarts rejoin the same run.
    """
    from torch.distributed import TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(minutes=5))
    if launch_rank() == 0:
        store.compare_set(key, "", value)
    return store.get(key).decode()


def local_devices() -> int | str:
    """Devices per node for trainer=ddp|fsdp: the processes torchrun started on this node, else 'auto'."""
    return int(os.environ["LOCAL_WORLD_SIZE"]) if os.environ.get("LOCAL_WORLD_SIZE") else "auto"


def num_nodes() -> int:
    """Nodes of a torchrun job (WORLD_SIZE / LOCAL_WORLD_SIZE), else 1."""
    world, per_node = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
    return max(1, int(world) // int(per_node)) if world and per_node else 1


def register_resolvers() -> None:
    resolvers = {"osp_run_id": run_id, "osp_devices": local_devices, "osp_num_nodes": num_nodes}
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


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
    if cfg.trainer.get("strategy") in ("fsdp", "fsdp_cpu_offload"):
        raise ConfigError(f"trainer.strategy={cfg.trainer.strategy!r} is Lightning's FSDP1 wrapper, which "
                          "osp does not support; use trainer=fsdp (FSDP2)")
    build_model_config(cfg, vocab_size=1)
    try:
        optim_config(cfg.optim)
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        build_scheduler(dummy, cfg.optim, max_steps)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_module(cfg: DictConfig, vocab_size: int) -> LanguageModelModule:
    """The LightningModule of a composed config, for the data's vocabulary size."""
    return LanguageModelModule(build_model_config(cfg, vocab_size), cfg.optim, compile=bool(cfg.compile),
                               activation_checkpointing=bool(cfg.get("activation_checkpointing", False)))


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback],
                  loggers: list[Any]) -> L.Trainer:
    """L.Trainer from `cfg.trainer`; a strategy given as a `_target_` node (trainer=ddp|fsdp) is built."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = kwargs.pop("strategy", "auto")
    if isinstance(strategy, dict):
        strategy = instantiate(strategy)
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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by a composed config; returns the end-of-run summary.

    Raises `Preempted` when a signal stopped the run (after its checkpoint was saved).
    """
    run_dir = Path(cfg.run_dir)
    preflight(cfg)
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule.vocab_size)
    resumed = checkpoint_metadata(Path(ckpt_path)) if ckpt_path else None
    trainer = build_trainer(cfg, run_dir, build_callbacks(cfg), build_loggers(cfg, run_dir, resumed))
    if trainer.is_global_zero:
        # Beside the checkpoints, so export and eval find the tokenizer from the run dir alone.
        datamodule.tokenizer.save_pretrained(str(run_dir / "tokenizer"))
        n = module.model.num_params()
        print(f"osp: run {cfg.run_name} -> {run_dir}  |  model {n / 1e6:.2f}M params "
              f"({module.model.num_params(exclude_embedding=True) / 1e6:.2f}M non-embedding)"
              + (f"  |  {trainer.world_size} ranks" if trainer.world_size > 1 else "")
              + (f"  |  resuming from {ckpt_path} (step {resumed['global_step']})" if resumed else ""))
        if cfg.resume == "auto" and ckpt_path is None:
            print(f"osp: resume=auto: no checkpoint in {run_dir / 'checkpoints'} yet; starting at step 0")
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            if ckpt_path:  # the run's own checkpoints are expected there
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except Preempted as stop:
        if stop.requeue and trainer.is_global_zero:  # last: SLURM ends the job as soon as it is requeued
            requeue_slurm_job()
        raise
    if "val/loss" not in trainer.callback_metrics or trainer.global_step % int(cfg.trainer.val_check_interval):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    summary = collect_summary(cfg, trainer, module, time.perf_counter() - started)
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "summary.json", summary)
        if cfg.summary:
            print(format_summary(summary))
    return summary


def collect_summary(cfg: DictConfig, trainer: L.Trainer, module: LanguageModelModule, wall: float) -> dict[str, Any]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    summary: dict[str, Any] = {
        "run_name": str(cfg.run_name),
        "run_dir": str(Path(cfg.run_dir).resolve()),
        "recipe": str(cfg.name),
        "steps": int(trainer.global_step),
        "tokens_seen": int(module.tokens_seen),
        "wall_seconds": wall,
        "train_loss": metrics.get("train/loss"),
        "val_loss": metrics.get("val/loss"),
        "val_ppl": math.exp(min(metrics["val/loss"], 50.0)) if "val/loss" in metrics else None,
        "ln_vocab": math.log(module.model_cfg.vocab_size),
        "d_model": module.model_cfg.d_model,
        "params": module.model.num_params(),
        "world_size": trainer.world_size,
    }
    for callback in trainer.callbacks:
        if hasattr(callback, "final_metrics"):
            summary.update(callback.final_metrics())
    ckpt = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    summary["checkpoint"] = str(ckpt.resolve()) if ckpt.exists() else None
    summary["logs"] = str((Path(cfg.run_dir) / "csv" / "metrics.csv").resolve())
    return summary


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
    if "kurtosis" in s:
        lines.append(f"kurtosis       {fmt('kurtosis')}   (Gaussian floor at d={s['d_model']}: "
                     f"{fmt('kurtosis_floor', '.3f')}; osp_exact {fmt('kurtosis_exact')})")
    if "max_abs" in s:
        lines.append(f"max |h|        {fmt('max_abs', '.1f')}")
    if "ppl_w4a4" in s:
        lines.append(f"W4A4 ppl       {fmt('ppl_w4a4', '.2f')}   (fp {fmt('ppl_fp', '.2f')}, "
                     f"ratio {fmt('quant_ratio', '.3f')})")
    lines.append(f"checkpoint     {s['checkpoint'] or 'none'}")
    if s.get("export_dir"):
        lines.append(f"export         {s['export_dir']}")
    lines.append(f"logs           {s['logs']}")
    lines.append(f"summary        {Path(s['run_dir']) / 'summary.json'}")
    width = max(len(line) for line in lines)
    bar = "=" * width
    return "\n".join([bar, "osp summary".center(width), bar, *lines, bar])


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
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
            print(f"osp train: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None


def main(argv: list[str] | None = None) -> None:
    """Run training with Hydra overrides (argv defaults to sys.argv[1:])."""
    if not (CONFIG_DIR / "train.yaml").exists():
        raise SystemExit(f"osp: config directory {CONFIG_DIR} not found; install osp from a checkout "
                         "with `pip install -e .`")
    register_resolvers()
    # Pinned for this process and inherited by the ones Lightning starts for the other devices.
    os.environ["OSP_RUN_ID"] = run_id()
    args = list(sys.argv[1:] if argv is None else argv)
    if launch_rank() > 0:
        # Only rank 0 writes .hydra/ and the job log; the other ranks log to their console.
        args += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    sys.argv = [sys.argv[0], *args]
    _hydra_main()
