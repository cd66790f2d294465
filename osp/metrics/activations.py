"""Outlier statistics of a model: run it on token ids and reduce its hidden-state taps.

One code path serves the training callback (`OutlierMonitor`) and `osp eval --kurtosis`: the
model is run in eval mode under `torch.no_grad()`, in chunks of at most `max_tokens` tokens, and
statistics are accumulated per chunk, so a 128 x 2048-token OSP evaluation never holds all of its
hidden states at once.

Tap i is `hidden_states[i]` of the model (HF order): tap 0 = embedding output, tap i = output of
block i, tap L = final-norm output.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from osp.metrics.outliers import (
    channel_kurtosis_from_sums,
    channel_square_sums,
    gate_up_alignment,
    gaussian_floor,
    peak_channels,
    token_excess_kurtosis,
    token_max_median_ratio,
    top_channel_share,
)
from osp.model.eval_context import eval_mode

__all__ = [
    "Feed",
    "FEEDS",
    "outlier_stats",
    "model_kurtosis",
    "evaluate_kurtosis",
    "outlier_log_dict",
    "format_kurtosis",
    "INPUT_KINDS",
    "input_kind",
    "gate_up_alignments",
]

# The quantized linear inputs by what produces them: an RMSNorm (q/k/v and gate/up read one tensor, named
# after its first reader), the attention (o_proj) and the SwiGLU product (down_proj).
INPUT_KINDS = {"q_proj": "norm_fed", "gate_proj": "norm_fed", "o_proj": "o_proj", "down_proj": "down_proj"}


def input_kind(site: str) -> str | None:
    """"norm_fed", "o_proj" or "down_proj" for a linear-input site name ("block_01.mlp.down_proj"), else
    None."""
    return INPUT_KINDS.get(site.rsplit(".", 1)[-1])

# How the tokens reach the model for a measurement: each alone at position 0 (OSP's evaluate_kurtosis.py,
# comparable with the paper) or in their sequences.
Feed = Literal["osp_exact", "context"]
FEEDS: tuple[str, ...] = ("osp_exact", "context")


class _StatsAccumulator:
    """Streams the statistics of one activation site (a tap or a linear input) over chunks."""

    def __init__(self, full: bool) -> None:
        # full=False keeps only the kurtosis sums: the median sort and channel sums cost time.
        self.full = full
        self.n_tokens = 0
        self.d = 0
        self.kurtosis_sum: Tensor | None = None
        self.kurtosis_unclamped_sum: Tensor | None = None
        self.max_abs: Tensor | None = None
        self.max_median_sum: Tensor | None = None
        self.channel_sums: Tensor | None = None
        self.peak_counts: Tensor | None = None

    @staticmethod
    def _add(total: Tensor | None, value: Tensor) -> Tensor:
        return value if total is None else total + value

    def update(self, h: Tensor) -> None:
        k = token_excess_kurtosis(h)
        self.d = h.shape[-1]
        self.n_tokens += k.numel()
        self.kurtosis_sum = self._add(self.kurtosis_sum, k.clamp_min(0.0).sum())
        self.kurtosis_unclamped_sum = self._add(self.kurtosis_unclamped_sum, k.sum())
        peak = h.detach().abs().max().float()
        self.max_abs = peak if self.max_abs is None else torch.maximum(self.max_abs, peak)
        if self.full:
            self.max_median_sum = self._add(self.max_median_sum, token_max_median_ratio(h).sum())
            sums, _ = channel_square_sums(h)
            self.channel_sums = self._add(self.channel_sums, sums)
            self.peak_counts = self._add(self.peak_counts, torch.bincount(peak_channels(h), minlength=self.d))

    def result(self) -> dict[str, float]:
        if self.n_tokens == 0:
            raise RuntimeError("no activations were recorded")
        # One host sync per site, at the end, instead of one per chunk and statistic.
        out = {
            "kurtosis": self.kurtosis_sum.item() / self.n_tokens,
            "kurtosis_unclamped": self.kurtosis_unclamped_sum.item() / self.n_tokens,
            "max_abs": self.max_abs.item(),
        }
        if self.full:
            out["max_median"] = self.max_median_sum.item() / self.n_tokens
            out["channel_kurtosis"] = channel_kurtosis_from_sums(self.channel_sums, self.n_tokens).item()
            out["channel_share"] = top_channel_share(self.peak_counts).item()
        return out


@contextlib.contextmanager
def _linear_input_hooks(model: nn.Module, full: bool) -> Iterator[dict[str, _StatsAccumulator]]:
    """Forward pre-hooks on every nn.Linear under `model.layers` (the W4A4-quantized inputs).

    Yields {site name: accumulator}; the hooks are removed on exit. q/k/v (and gate/up) read the
    same tensor, so a linear whose input is the tensor the previous hook just saw is skipped and
    the site is named after the first reader (`block_03.self_attn.q_proj`).
    """
    # osp Transformer: model.layers; transformers causal LMs: model.model.layers.
    layers = getattr(model, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError("linear_inputs=True needs a model with a `layers` (or `model.layers`) nn.ModuleList")
    sites: dict[str, _StatsAccumulator] = {}
    last_input: list[Tensor | None] = [None]

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if x is None or x is last_input[0]:
                return
            last_input[0] = x
            sites.setdefault(name, _StatsAccumulator(full)).update(x)

        return hook

    handles = []
    try:
        for index, block in enumerate(layers):
            for sub_name, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    handles.append(module.register_forward_pre_hook(make_hook(f"block_{index:02d}.{sub_name}")))
        yield sites
    finally:
        for handle in handles:
            handle.remove()
        last_input[0] = None


def _chunks(input_ids: Tensor, feed: str, max_tokens: int | None) -> Iterator[Tensor]:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: nothing to measure")
    if feed not in FEEDS:
        raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
    if feed == "osp_exact":
        # OSP's evaluate_kurtosis.py feeds each token as its own length-1 sequence at position 0.
        input_ids = input_ids.reshape(-1, 1)
    rows = input_ids.shape[0] if max_tokens is None else max(1, max_tokens // input_ids.shape[1])
    yield from input_ids.split(rows)


def _hidden_states(model: nn.Module, input_ids: Tensor) -> Sequence[Tensor]:
    """The taps of an osp Transformer ((logits, hidden_states)) or of a transformers causal LM
    (an output with .hidden_states), so published HF checkpoints are measured the same way."""
    out = model(input_ids, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    if hidden is None and isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (list, tuple)):
        hidden = out[1]
    if hidden is None:
        raise TypeError("model(input_ids, output_hidden_states=True) must return (logits, hidden_states) "
                        "or an output with .hidden_states")
    return hidden


def outlier_stats(
    model: nn.Module,
    input_ids: Tensor,
    feed: Feed = "context",
    *,
    full: bool = True,
    linear_inputs: bool = False,
    max_tokens: int | None = 8192,
) -> dict:
    """Per-tap outlier statistics of `model` on `input_ids` (B, T).

    Returns {"feed", "d", "n_tokens", "n_taps", and per-tap lists "kurtosis" (OSP, relu-clamped),
    "kurtosis_unclamped", "max_abs", plus "max_median" and "channel_kurtosis" when full}; with
    linear_inputs, also "linear_inputs": {site: {same statistics, plus "channel_share" when full}} for each
    distinct block-linear input, and "gate_up_alignment": [per block] (see `gate_up_alignment`).
    """
    input_ids = input_ids.to(next(model.parameters()).device)
    taps: list[_StatsAccumulator] = []
    with eval_mode(model), torch.no_grad():
        hooks = _linear_input_hooks(model, full) if linear_inputs else contextlib.nullcontext({})
        with hooks as sites:
            for chunk in _chunks(input_ids, feed, max_tokens):
                hidden = _hidden_states(model, chunk)
                if not taps:
                    taps = [_StatsAccumulator(full) for _ in hidden]
                if len(hidden) != len(taps):
                    raise RuntimeError("the number of hidden-state taps changed between chunks")
                for accumulator, h in zip(taps, hidden, strict=True):
                    accumulator.update(h)
    per_tap = [accumulator.result() for accumulator in taps]
    stats: dict = {
        "feed": feed,
        "d": taps[0].d,
        "n_tokens": taps[0].n_tokens,
        "n_taps": len(taps),
        **{key: [site[key] for site in per_tap] for key in per_tap[0]},
    }
    if linear_inputs:
        stats["linear_inputs"] = {name: accumulator.result() for name, accumulator in sites.items()}
        stats["gate_up_alignment"] = gate_up_alignments(model)
    return stats


def model_kurtosis(
    model: nn.Module, input_ids: Tensor, feed: Feed = "osp_exact", *, max_tokens: int | None = 8192
) -> dict:
    """OSP kurtosis per tap and its mean over taps.

    Returns {"per_tap", "mean", "unclamped_per_tap", "unclamped_mean", "d", "n_tokens"}.

    feed="osp_exact" feeds every token alone (comparable with the OSP paper's numbers);
    feed="context" feeds the sequences as they are.
    """
    stats = outlier_stats(model, input_ids, feed, full=False, max_tokens=max_tokens)
    return {
        "per_tap": stats["kurtosis"],
        "mean": sum(stats["kurtosis"]) / stats["n_taps"],
        "unclamped_per_tap": stats["kurtosis_unclamped"],
        "unclamped_mean": sum(stats["kurtosis_unclamped"]) / stats["n_taps"],
        "d": stats["d"],
        "n_tokens": stats["n_tokens"],
    }


def evaluate_kurtosis(
    model: nn.Module, input_ids: Tensor, feed: Feed = "osp_exact", *, max_tokens: int | None = 8192
) -> dict:
    """`model_kurtosis` plus its reference points: the Gaussian floor at this width, the mean as a
    ratio to that floor, the largest tap and the mean as a fraction of the maximum d - 3.

    This is what `osp eval --kurtosis` reports and what `OutlierMonitor` logs as
    `outliers/kurtosis_exact_mean`.
    """
    result = model_kurtosis(model, input_ids, feed, max_tokens=max_tokens)
    d = result["d"]
    floor = gaussian_floor(d)
    result.update(
        feed=feed,
        max=max(result["per_tap"]),
        floor=floor,
        floor_ratio=result["mean"] / floor,
        fraction_of_max=result["mean"] / (d - 3) if d > 3 else math.nan,
    )
    return result


def outlier_log_dict(context: dict, exact: dict | None = None, prefix: str = "outliers") -> dict[str, float]:
    """Flatten `outlier_stats` (context feed) and optionally `evaluate_kurtosis` (osp_exact) into
    logger keys: `{prefix}/kurtosis/layer_03`, `{prefix}/kurtosis_mean`, `{prefix}/max_abs_max`, ...
    """
    n = context["n_taps"]
    floor = gaussian_floor(context["d"])
    metrics: dict[str, float] = {}
    per_layer = ("kurtosis", "max_abs", "max_median", "channel_kurtosis")
    for key in per_layer:
        if key in context:
            for tap, value in enumerate(context[key]):
                metrics[f"{prefix}/{key}/layer_{tap:02d}"] = value
    kurtosis = context["kurtosis"]
    metrics[f"{prefix}/kurtosis_mean"] = sum(kurtosis) / n
    metrics[f"{prefix}/kurtosis_max"] = max(kurtosis)
    metrics[f"{prefix}/kurtosis_unclamped_mean"] = sum(context["kurtosis_unclamped"]) / n
    metrics[f"{prefix}/kurtosis_floor"] = floor
    metrics[f"{prefix}/kurtosis_floor_ratio"] = metrics[f"{prefix}/kurtosis_mean"] / floor
    metrics[f"{prefix}/max_abs_max"] = max(context["max_abs"])
    if "max_median" in context:
        metrics[f"{prefix}/max_median_mean"] = sum(context["max_median"]) / n
        metrics[f"{prefix}/channel_kurtosis_mean"] = sum(context["channel_kurtosis"]) / n
    if exact is not None:
        for tap, value in enumerate(exact["per_tap"]):
            metrics[f"{prefix}/kurtosis_exact/layer_{tap:02d}"] = value
        metrics[f"{prefix}/kurtosis_exact_mean"] = exact["mean"]
        metrics[f"{prefix}/kurtosis_exact_unclamped_mean"] = exact["unclamped_mean"]
        metrics[f"{prefix}/kurtosis_exact_floor_ratio"] = exact["mean"] / floor
    by_kind: dict[str, list[dict[str, float]]] = {}
    for site, values in context.get("linear_inputs", {}).items():
        for key in ("kurtosis", "max_abs", "max_median", "channel_share"):
            if key in values:
                metrics[f"{prefix}/linear_{key}/{site}"] = values[key]
        kind = input_kind(site)
        if kind is not None:
            by_kind.setdefault(kind, []).append(values)
    # Per kind of input: the mean over layers (max|x|: the largest), what the summary and the sweep report.
    for kind, sites in by_kind.items():
        metrics[f"{prefix}/{kind}_kurtosis_mean"] = sum(v["kurtosis"] for v in sites) / len(sites)
        metrics[f"{prefix}/{kind}_max_abs_max"] = max(v["max_abs"] for v in sites)
        for key in ("max_median", "channel_share"):
            if all(key in v for v in sites):
                metrics[f"{prefix}/{kind}_{key}_mean"] = sum(v[key] for v in sites) / len(sites)
    for layer, value in enumerate(context.get("gate_up_alignment", [])):
        metrics[f"{prefix}/gate_up_alignment/layer_{layer:02d}"] = value
    if context.get("gate_up_alignment"):
        values = context["gate_up_alignment"]
        metrics[f"{prefix}/gate_up_alignment_mean"] = sum(values) / len(values)
    return metrics


def gate_up_alignments(model: nn.Module) -> list[float]:
    """`gate_up_alignment` of every block's SwiGLU (osp Transformer or an HF Llama), in block order."""
    layers = getattr(model, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", [])
    out = []
    for block in layers:
        mlp = getattr(block, "mlp", None)
        if mlp is not None and hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
            out.append(float(gate_up_alignment(_dense(mlp.gate_proj.weight), _dense(mlp.up_proj.weight))))
    return out


def _dense(weight: Tensor) -> Tensor:
    """A weight as a plain tensor (gathered when FSDP2 shards it: a collective, every rank calls it)."""
    full_tensor = getattr(weight, "full_tensor", None)
    return (full_tensor() if callable(full_tensor) else weight).detach()


def format_kurtosis(result: dict) -> str:
    """Human-readable lines for an `evaluate_kurtosis` result (used by `osp eval --kurtosis`)."""
    taps = "  ".join(f"{i:02d}:{value:.3g}" for i, value in enumerate(result["per_tap"]))
    return "\n".join([
        f"kurtosis ({result['feed']}, d={result['d']}, {result['n_tokens']:,} tokens): "
        f"mean {result['mean']:.4g}, max {result['max']:.4g}, un-clamped mean {result['unclamped_mean']:.4g}",
        f"  Gaussian floor {result['floor']:.4g} (mean = {result['floor_ratio']:.3g} x floor, "
        f"{100 * result['fraction_of_max']:.3g}% of the maximum d-3)",
        f"  per tap (0 = embedding, {len(result['per_tap']) - 1} = final norm): {taps}",
    ])
