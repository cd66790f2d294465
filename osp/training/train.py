"""Hydra entry point: compose the config, build data, model, callbacks and loggers, fit, summarise.

`osp train [overrides]` and `python -m osp.train [overrides]` (also under torchrun) both land in `main`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import warnings

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from osp.model import ConfigError, ModelConfig
from osp.training.module import LanguageModelModule

# Noise that every run would print and no user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
_RUN_ID = time.strftime("%Y%m%d-%H%M%S")


def run_id() -> str:
    """An id that every rank of one job agrees on: SLURM job (+ array task), torchrun run id, else a timestamp.

    The timestamp is only safe for single-process runs; launchers pass run_name explicitly.
    """
    if os.environ.get("SLURM_JOB_ID"):
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm{os.environ['SLURM_JOB_ID']}" + (f"_{task}" if task else "")
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if elastic and elastic != "none":
        return elastic[:12]
    return _RUN_ID


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("osp_run_id"):
        OmegaConf.register_new_resolver("osp_run_id", run_id)


def wandb_mode(requested: str | None) -> str:
    """online when a key is configured, offline otherwise; WANDB_MODE in the environment wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested:
        return requested
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="", version="csv"))
    if cfg.logger.wandb.enabled:
        mode = wandb_mode(cfg.logger.wandb.mode)
        if mode != "disabled":
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(project=cfg.logger.wandb.project, entity=cfg.logger.wandb.entity,
                                       name=str(cfg.run_name), save_dir=str(run_dir), mode=mode,
                                       config=OmegaConf.to_container(cfg, resolve=True)))
    if cfg.logger.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard"))
    return loggers


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ConfigError(f"callbacks.{name} needs a _target_ (the callback class)")
        callbacks.append(instantiate(node))
    return callbacks


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint file")
    return str(path)


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
    build_model_config(cfg, vocab_size=1)
    try:
        optim_config(cfg.optim)
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        build_scheduler(dummy, cfg.optim, max_steps)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by a composed config; returns the end-of-run summary."""
    run_dir = Path(cfg.run_dir)
    preflight(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model_cfg = build_model_config(cfg, datamodule.vocab_size)
    module = LanguageModelModule(model_cfg, cfg.optim, compile=bool(cfg.compile))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = L.Trainer(
        **trainer_kwargs,
        default_root_dir=str(run_dir),
        callbacks=build_callbacks(cfg),
        logger=build_loggers(cfg, run_dir),
        gradient_clip_val=cfg.optim.get("grad_clip"),
        enable_model_summary=False,
    )
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    if trainer.is_global_zero:
        # Beside the checkpoints, so export and eval find the tokenizer from the run dir alone.
        datamodule.tokenizer.save_pretrained(str(run_dir / "tokenizer"))
        n = module.model.num_params()
        print(f"osp: run {cfg.run_name} -> {run_dir}  |  model {n / 1e6:.2f}M params "
              f"({module.model.num_params(exclude_embedding=True) / 1e6:.2f}M non-embedding)"
              + (f"  |  resuming from {ckpt_path}" if ckpt_path else ""))
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
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


def main(argv: list[str] | None = None) -> None:
    """Run training with Hydra overrides (argv defaults to sys.argv[1:])."""
    if not (CONFIG_DIR / "train.yaml").exists():
        raise SystemExit(f"osp: config directory {CONFIG_DIR} not found; install osp from a checkout "
                         "with `pip install -e .`")
    register_resolvers()
    args = list(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("RANK", "0")) > 0:
        args.append("hydra.output_subdir=null")  # only rank 0 writes .hydra/
    sys.argv = [sys.argv[0], *args]
    _hydra_main()
