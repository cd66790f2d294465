"""The end-of-run summary: what `summary.json` records, how `osp train` prints it, and the outlier verdict."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from osp.training.module import LanguageModelModule


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or Infinity: a non-finite metric is recorded as null ("n/a" when printed)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def collect_summary(cfg: DictConfig, trainer: L.Trainer, module: LanguageModelModule, wall: float,
                    status: str) -> dict[str, Any]:
    """The end-of-run record: status (finished | stopped), losses, outlier and W4A4 numbers, where things
    are."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if torch.is_tensor(v) and v.numel() == 1}
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
        return ("n/a" if value is None or (isinstance(value, float) and math.isnan(value))
                else format(value, spec))

    lines = [
        f"run            {s['run_name']}  ({s['steps']} steps, {s['wall_seconds']:.0f} s)",
        f"tokens seen    {s['tokens_seen']:,}   ({fmt('tokens_per_s', ',.0f')} tokens/s)",
        f"train loss     {fmt('train_loss', '.3f')}",
        f"val loss       {fmt('val_loss', '.3f')}   (ln vocab = {s['ln_vocab']:.2f})",
        f"val ppl        {fmt('val_ppl', '.2f')}",
    ]
    if s.get("skipped_steps"):
        lines.append(f"skipped steps  {s['skipped_steps']} (non-finite loss or gradient)")
    if "kurtosis" in s:
        lines.append(f"kurtosis       {fmt('kurtosis')} = {fmt('kurtosis_floor_ratio', '.3g')}x "
                     f"the Gaussian floor {fmt('kurtosis_floor', '.3f')} at d={s['d_model']}   "
                     f"(osp_exact {fmt('kurtosis_exact')})")
    if "max_abs" in s:
        lines.append(f"max |h|        {fmt('max_abs', '.1f')}")
    if "down_proj_max_median" in s:
        lines.append(f"down_proj in   max/median {fmt('down_proj_max_median', '.3g')} per token, kurtosis "
                     f"{fmt('down_proj_kurtosis', '.3g')}   (norm-fed inputs: max/median "
                     f"{fmt('norm_fed_max_median', '.3g')})")
        lines.append(f"tail shape     {tail_shape(s.get('down_proj_channel_share'))}; gate/up alignment "
                     f"{fmt('gate_up_alignment', '.2f')}")
    if "ppl_w4a4" in s:
        preset = f"preset {s['quant_preset']}; " if s.get("quant_preset") else ""
        lines.append(f"W4A4 ppl       {fmt('ppl_w4a4', '.2f')}   ({preset}fp {fmt('ppl_fp', '.2f')}, "
                     f"ratio {fmt('quant_ratio', '.3f')})")
    lines += outlier_story(s)
    lines.append(f"checkpoint     {shown(s['checkpoint']) if s['checkpoint'] else 'none'}")
    if s.get("export_dir"):
        lines.append(f"export         {shown(s['export_dir'])}")
    lines.append(f"logs           {shown(s['logs'])}")
    lines.append(f"summary        {shown(Path(s['run_dir']) / 'summary.json')}")
    width = max(len(line) for line in lines)
    bar = "=" * width
    return "\n".join([bar, "osp summary".center(width), bar, *lines, bar])


def tail_shape(share: float | None) -> str:
    """A down_proj tail described by its top-channel share (osp.metrics.top_channel_share)."""
    if share is None:
        return "tail shape n/a"
    kind = "channel-concentrated" if share >= 0.5 else "spread over tokens"
    return f"{kind} (a token's peak in the top-8 channels for {100 * share:.0f}% of tokens)"


def shown(path: str | Path) -> str:
    """A path as the summary prints it: relative to the working directory when inside it (summary.json keeps
    it absolute), so the printed commands are short and paste as they are."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# Kurtosis as a multiple of the Gaussian floor (what Gaussian activations of this width give): up to
# OUTLIER_FREE the activations look Gaussian (OSP's 1.4B model: 1x); beyond HEAVY_OUTLIERS they have the
# heavy tails that break 4-bit activations (OSP's AdamW 1.4B model: 4.4e4x; the tiny AdamW demo: ~70x).
OUTLIER_FREE, HEAVY_OUTLIERS = 3.0, 10.0
# The default A/B's outlier-safe arm: OSP + the FFN tail loss (docs/outlier_safe_ffn.md), which also keeps
# the down_proj input in check at no cost in quality; `recipe=osp` (the paper's OSP) points back to the
# baseline too.
OUTLIER_SAFE_ARM = "osp_ffn_tail"


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
    other = OUTLIER_SAFE_ARM if baseline else "tiny"
    if s.get("recipe") in ("tiny", "osp", OUTLIER_SAFE_ARM):  # the demo A/B: same data, budget and lr
        what = ("the outlier-safe arm (Muon + SSNorm + EmbProj + FFN tail loss)" if baseline
                else "the AdamW baseline arm")
        lines.append(f"A/B            {what}: osp train recipe={other}")
        run_dir = Path(shown(s["run_dir"]))
        lines.append(f"               then: osp report {run_dir} {run_dir.parent / other}-*")
    return lines
