"""Which quantized site costs the perplexity: the view applied to one site (or one layer, or one kind of site)
at a time, everything else in full precision.

    rows = attribute(model, blocks, "w4a4kv4")      # what `osp eval MODEL --quant w4a4kv4 --attribute` prints

A site is one linear of a block ("layers.2.mlp.down_proj": its weight and its input, as the preset quantizes
them) or one KV cache ("layers.2.kv"). With `w16a4kv4` the weights stay in full precision, so a site's cost
is its input's alone. Costs do not add up to the full view's exactly (errors interact); `share` says how much
of the full view's extra NLL the site causes alone. Each site's input is described by its full-precision
statistics on the same blocks: max |x| and OSP's kurtosis (per token over the input's channels, mean over
tokens; a heavy-tailed input is what 4-bit scales cannot represent).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..metrics.outliers import token_excess_kurtosis
from .config import QuantConfig
from .w4a4 import input_absmax, nll_stats, observe_inputs, quantized, site_names, smoothing_of


def _kind(name: str) -> str:
    """"layers.2.mlp.down_proj" -> "mlp.down_proj"; "layers.2.kv" -> "kv"."""
    return name.split(".", 2)[2]


def input_statistics(model: nn.Module, blocks: torch.Tensor,
                     batch_size: int = 8) -> dict[str, dict[str, float]]:
    """{site: {"max_abs", "kurtosis"}} of every linear's input inside the blocks, full precision; kurtosis is
    OSP's (per token over the input's channels, negatives clamped to 0, mean over tokens), streamed."""
    sums: dict[str, list[float]] = {}  # name -> [max |x|, sum of token kurtosis, tokens]

    def keep(name: str, x: torch.Tensor) -> None:
        x = x.float()
        k = token_excess_kurtosis(x).clamp_min(0.0)
        acc = sums.setdefault(name, [0.0, 0.0, 0])
        acc[0] = max(acc[0], float(x.abs().amax()))
        acc[1] += float(k.sum())
        acc[2] += k.numel()

    observe_inputs(model, blocks, batch_size, keep)
    return {name: {"max_abs": peak, "kurtosis": total / count} for name, (peak, total, count) in sums.items()}


def attribute(model: nn.Module, blocks: torch.Tensor, preset: QuantConfig | str = "w4a4kv4", *,
              calib_blocks: torch.Tensor | None = None, batch_size: int = 8,
              backend: str | None = None) -> dict[str, Any]:
    """The cost of the view at each site alone, each layer alone and each kind of site alone.

    Returns {"preset", "nll_fp", "nll_quant", "tokens", "sites": [...], "layers": [...], "kinds": [...]};
    every row is {"name", "nll", "delta_nll", "ppl_ratio", "share"} (+ "max_abs", "kurtosis" for linear
    sites), sorted by cost, largest first.
    """
    cfg = QuantConfig.resolve(preset)
    nll_fp, tokens = nll_stats(model, blocks, batch_size)
    # Smoothing and static scales come from the full-precision model: calibrate once, not in every view below.
    smoothing = smoothing_of(model, cfg, calib_blocks, batch_size)
    absmax = (input_absmax(model, cfg, calib_blocks, batch_size, smoothing=smoothing)
              if cfg.a_static and calib_blocks is not None else None)

    def cost(only: Any) -> float:
        with quantized(model, cfg, calib_blocks=calib_blocks, calib_batch_size=batch_size, backend=backend,
                       only=only, static_absmax=absmax, smoothing=smoothing):
            return nll_stats(model, blocks, batch_size)[0]

    full = cost(None)
    names = site_names(model)
    stats = input_statistics(model, blocks, batch_size)

    def row(name: str, nll: float) -> dict[str, Any]:
        delta = (nll - nll_fp) / tokens
        extra = (full - nll_fp) / tokens
        out = {"name": name, "nll": nll / tokens, "delta_nll": delta, "ppl_ratio": math.exp(delta),
               "share": delta / extra if extra > 0 else float("nan")}
        out.update(stats.get(name, {}))
        return out

    def rows(groups: dict[str, set[str]]) -> list[dict[str, Any]]:
        measured = [row(label, cost(lambda name, members=members: name in members))
                    for label, members in groups.items()]
        return sorted(measured, key=lambda r: r["delta_nll"], reverse=True)

    layers = sorted({name.split(".")[1] for name in names}, key=int)
    kinds = list(dict.fromkeys(_kind(name) for name in names))
    return {
        "preset": cfg.name, "nll_fp": nll_fp / tokens, "nll_quant": full / tokens, "tokens": tokens,
        "ppl_ratio": math.exp((full - nll_fp) / tokens),
        "sites": rows({name: {name} for name in names}),
        "layers": rows({f"layers.{i}": {n for n in names if n.split(".")[1] == i} for i in layers}),
        "kinds": rows({kind: {n for n in names if _kind(n) == kind} for kind in kinds}),
    }


def format_attribution(result: dict[str, Any], top: int = 10) -> str:
    """The report `osp eval --attribute` prints: the costliest sites, then per layer and per kind."""
    from ..tables import format_rows

    def table(title: str, rows: list[dict[str, Any]], stats: bool) -> str:
        header = ["site" if stats else title, "ppl x", "share"] + (["max|x|", "kurt(x)"] if stats else [])
        body = [[r["name"], f"{r['ppl_ratio']:.4f}", f"{r['share']:.0%}" if r["share"] == r["share"] else "-"]
                + ([f"{r['max_abs']:.3g}", f"{r['kurtosis']:.3g}"] if stats and "max_abs" in r
                   else (["-", "-"] if stats else []))
                for r in rows]
        return format_rows([header, *body])

    lines = [f"attribution of {result['preset']}: the full view costs ppl x {result['ppl_ratio']:.4f} "
             f"({result['tokens']:,} tokens); each row quantizes only that site (share: of the full view's "
             "extra NLL; rows overlap and interact, so shares need not sum to 100%)",
             f"costliest {min(top, len(result['sites']))} of {len(result['sites'])} sites "
             "(max|x|, kurt(x): the site's full-precision input):",
             table("site", result["sites"][:top], stats=True), "",
             table("layer", result["layers"], stats=False), "",
             table("kind", result["kinds"], stats=False)]
    return "\n".join(lines)
