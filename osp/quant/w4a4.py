"""The W4A4 view of a live model (`quantized`) and perplexity.

The view reaches into the model through its seams only (DESIGN.md): every `nn.Linear` inside
`model.layers` is swapped for a `QuantLinear` for the duration of the context, and every attention module's
`kv_quantizer` is set. Parameters are never written, so leaving the context restores the model bit for bit,
also when the body raises.

Coverage: *every* nn.Linear inside the blocks, including those that later blocks add (attention gates,
GatedNorm's down/up maps): weights per output channel, inputs per token. The embedding, EmbProj maps, final
norm and lm_head (weights and input) stay in full precision, as in OSP's harness (EmbProj counts as merged
into the embedding and head).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from osp.errors import QuantConfigError

from ..model.eval_context import eval_mode
from . import ops
from .config import OFF, QuantConfig
from .gptq import gptq_quantize_model
from .hadamard import has_hadamard, is_pow2
from .layers import ActQuant, KVQuantizer, QuantLinear
from .quantizers import quantize_weight
from .smooth import (
    FoldedScales,
    Smoothing,
    folded_scales,
    reader_scales,
    scaled,
    smooth_groups,
    trained_smoothing,
)


def _full_weight(linear: nn.Linear) -> torch.Tensor:
    """The dense weight, gathered if FSDP2 shards it (a collective: every rank builds the view in step)."""
    w = linear.weight.detach()
    full_tensor = getattr(w, "full_tensor", None)  # DTensor
    return full_tensor() if callable(full_tensor) else w


def _base_model(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no `layers` ModuleList; the W4A4 view needs osp's Transformer"
        )
    return model


@dataclass
class _Site:
    parent: nn.Module
    attr: str
    name: str  # qualified name inside the model, e.g. "layers.0.mlp.down_proj"
    linear: nn.Linear
    head_dim: int | None  # set for attention output projections


def _linear_sites(model: nn.Module) -> list[_Site]:
    if any(isinstance(m, QuantLinear) for m in model.layers.modules()):
        raise RuntimeError("the model is already inside a quantized() view")
    sites: list[_Site] = []
    for i, block in enumerate(model.layers):
        for name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            head_dim = getattr(parent, "head_dim", None) if attr == "o_proj" else None
            sites.append(_Site(parent, attr, f"layers.{i}.{name}", module, head_dim))
    return sites


def _act_quant(cfg: QuantConfig, site: _Site, absmax: float | None = None) -> ActQuant | None:
    if cfg.a_bits == OFF:
        return None
    if cfg.a_static:
        assert absmax is not None, f"{site.name}: static scales need calibration"
        hi = (1 << (cfg.a_bits - 1)) - 1
        return ActQuant(cfg.a_bits, True, None, cfg.a_clip, static_scale=max(absmax * cfg.a_clip, 1e-12) / hi)
    group = site.head_dim if (site.head_dim and cfg.o_proj_head_groups) else cfg.a_group_size
    if group is not None and site.linear.in_features % group:
        raise QuantConfigError(
            f"{site.name}: input width {site.linear.in_features} is not a multiple of the activation "
            f"group {group}"
        )
    return ActQuant(cfg.a_bits, cfg.a_sym, group, cfg.a_clip)


def _effective_weight(cfg: QuantConfig, site: _Site, rotate: bool, folded: FoldedScales | None = None
                      ) -> torch.Tensor:
    """fp32 weight the quantizer sees: with smoothing folded in (diag(1/rows) W diag(columns)), as a bf16 copy
    (if configured), rotated by the Hadamard if any."""
    w = _full_weight(site.linear).float()
    if folded is not None and site.name in folded.columns:
        w = w * folded.columns[site.name].to(w.device)
    if folded is not None and site.name in folded.rows:
        w = w / folded.rows[site.name].to(w.device)[:, None]
    if cfg.w_round_bf16 and cfg.w_bits != OFF:
        w = w.bfloat16().float()
    if rotate:
        w = ops.hadamard_transform(w.double(), "torch").float()  # fold H into the columns: x W^T = (xM)(WM)^T
    return w


def _check_supported(cfg: QuantConfig, model: nn.Module, sites: list[_Site]) -> None:
    if cfg.kv_bits != OFF:
        attns = [m for m in model.layers.modules() if hasattr(m, "kv_quantizer")]
        if not attns:
            raise QuantConfigError(
                "kv_bits < 16, but no attention module in model.layers has a `kv_quantizer` seam"
            )
        for m in attns:
            if cfg.k_hadamard and not is_pow2(int(getattr(m, "head_dim", 0))):
                raise QuantConfigError(
                    f"the K Hadamard needs a power-of-two head_dim, got {getattr(m, 'head_dim', None)}; "
                    "set k_hadamard=False"
                )
    if cfg.down_hadamard:
        downs = [s for s in sites if s.attr == "down_proj"]
        if not downs:
            raise QuantConfigError("down_hadamard=True, but the blocks have no `down_proj` linear")
        for s in downs:
            if not has_hadamard(s.linear.in_features):
                raise QuantConfigError(f"{s.name}: no Hadamard matrix of order {s.linear.in_features} "
                                       "is available")


def kv_sites(model: nn.Module) -> dict[str, nn.Module]:
    """{"layers.{i}.kv": attention module}: the KV-cache quantizer seams, named like the linear sites."""
    return {f"layers.{i}.kv": m for i, block in enumerate(model.layers) for m in block.modules()
            if hasattr(m, "kv_quantizer")}


def site_names(model: nn.Module) -> list[str]:
    """Every place the view quantizes: the linears inside the blocks ("layers.0.mlp.down_proj") and the KV
    caches ("layers.0.kv"), in block order."""
    base = _base_model(model)
    linears = [site.name for site in _linear_sites(base)]
    kvs = list(kv_sites(base))
    return sorted(linears + kvs, key=lambda name: (int(name.split(".")[1]), name.endswith(".kv"), 0))


@torch.no_grad()
def observe_inputs(model: nn.Module, blocks: torch.Tensor, batch_size: int,
                   observe: Callable[[str, torch.Tensor], None], sites: list[_Site] | None = None) -> None:
    """Run `blocks` through the full-precision model in eval mode, calling observe(site name, input) for every
    linear site's input (`sites`: a subset; default all of them)."""
    base = _base_model(model)
    hooks = [site.linear.register_forward_pre_hook(
                 lambda module, args, name=site.name: observe(name, args[0]))
             for site in (_linear_sites(base) if sites is None else sites)]
    device = next(model.parameters()).device
    try:
        with eval_mode(model):
            for start in range(0, blocks.shape[0], batch_size):
                model(blocks[start : start + batch_size, :-1].to(device))
    finally:
        for hook in hooks:
            hook.remove()


def smoothing_of(model: nn.Module, cfg: QuantConfig | str, blocks: torch.Tensor | None = None,
                 batch_size: int = 8) -> list[Smoothing]:
    """The smoothing the view applies: calibrated on `blocks` (N, T+1) for a +smooth preset (max |x_j| on the
    full-precision model), else what a `model.smooth_swiglu` model trained (else none)."""
    cfg = QuantConfig.resolve(cfg)
    base = _base_model(model)
    if cfg.smooth_alpha is None:
        return trained_smoothing(base)
    if blocks is None:
        raise QuantConfigError("+smooth needs calibration blocks (calib_blocks=LongTensor (N, T+1))")
    groups = smooth_groups(base)
    if not groups:
        raise QuantConfigError("+smooth: the model has no input that folds into a preceding layer "
                               "(SwiGLU up_proj or an RMSNorm/SSNorm gain)")
    readers = {reader for group in groups for reader in group.readers}
    absmax: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        if name in readers:
            peak = x.detach().float().abs().flatten(0, -2).amax(0)
            absmax[name] = peak if name not in absmax else torch.maximum(absmax[name], peak)

    observe_inputs(base, blocks, batch_size, observe)
    return [scaled(group, torch.stack([absmax[r] for r in group.readers]).amax(0), base, cfg.smooth_alpha)
            for group in groups]


def input_absmax(model: nn.Module, cfg: QuantConfig | str, blocks: torch.Tensor, batch_size: int = 8,
                 sites: list[_Site] | None = None,
                 smoothing: list[Smoothing] | None = None) -> dict[str, float]:
    """max |x| of every linear site's input (smoothed and rotated where the view smooths and rotates it) over
    `blocks`, on the full-precision model: the calibration of static per-tensor scales (`sites`: a subset;
    `smoothing`: as `smoothing_of` gives it, computed here when not passed)."""
    cfg = QuantConfig.resolve(cfg)
    sites = _linear_sites(_base_model(model)) if sites is None else sites
    absmax = {site.name: 0.0 for site in sites}
    rotated = {site.name for site in sites if cfg.down_hadamard and site.attr == "down_proj"}
    scales = reader_scales(smoothing_of(model, cfg, blocks, batch_size) if smoothing is None else smoothing)

    def observe(name: str, x: torch.Tensor) -> None:
        x = x.float() / scales[name] if name in scales else x
        x = ops.hadamard_transform(x.float(), "torch") if name in rotated else x
        absmax[name] = max(absmax[name], float(x.abs().amax()))

    observe_inputs(model, blocks, batch_size, observe, sites)
    return absmax


@contextmanager
def quantized(
    model: nn.Module,
    cfg: QuantConfig | str = "w4a4kv4",
    *,
    calib_blocks: torch.Tensor | None = None,
    calib_batch_size: int = 8,
    backend: str | None = None,
    only: Callable[[str], bool] | None = None,
    static_absmax: Mapping[str, float] | None = None,
    smoothing: list[Smoothing] | None = None,
) -> Iterator[nn.Module]:
    """Context manager: the W4A4 view of `model` (yields the model itself).

    On entry the weights are quantized once (RTN, or GPTQ with `calib_blocks` when cfg.w_method == "gptq"),
    every nn.Linear inside `model.layers` is replaced by a `QuantLinear` that quantizes its input per token
    (or, with cfg.a_static, with a static per-tensor scale calibrated on `calib_blocks` in full precision),
    and every attention's `kv_quantizer` is set. `only(name)` restricts the view to the sites it accepts
    (names as `site_names`: "layers.0.mlp.down_proj", "layers.0.kv"); the rest stay in full precision. A
    static preset's calibration may be passed in as `static_absmax` (from `input_absmax`), for views opened
    many times over the same calibration (attribution), and so may the smoothing (`smoothing_of`). On exit
    (also on an exception) the original modules and kv_quantizers are put back; parameters are never modified.
    `backend` forces "torch" or "triton" kernels.
    """
    cfg = QuantConfig.resolve(cfg)
    base = _base_model(model)
    every_site = _linear_sites(base)
    # the model's support, not the subset's (only= may leave out down_proj)
    _check_supported(cfg, base, every_site)
    sites = [site for site in every_site if only is None or only(site.name)]
    static = cfg.a_static and static_absmax is None
    if (cfg.w_method == "gptq" or static) and calib_blocks is None:
        what = "GPTQ weights" if cfg.w_method == "gptq" else "static activation scales"
        raise QuantConfigError(f"{what} need calibration blocks (calib_blocks=LongTensor (N, T+1))")
    if smoothing is None:
        smoothing = smoothing_of(base, cfg, calib_blocks, calib_batch_size)
    folded = folded_scales(smoothing, {site.name for site in every_site})
    absmax = input_absmax(base, cfg, calib_blocks, calib_batch_size, sites, smoothing) if static else (  # type: ignore[arg-type]
        static_absmax or {})

    installed: list[_Site] = []
    kv_saved: list[tuple[nn.Module, object]] = []
    try:
        with torch.no_grad():
            built = [_build_wrapper(cfg, site, backend, absmax.get(site.name), folded) for site in sites]
            for site, (wrapper, _) in zip(sites, built):
                setattr(site.parent, site.attr, wrapper)
                installed.append(site)
            if cfg.w_method == "gptq":
                gptq_quantize_model(base, dict(built), calib_blocks, cfg, calib_batch_size)  # type: ignore[arg-type]
                for wrapper, _ in built:
                    wrapper.quantize_input = wrapper.act is not None
            del built
            if cfg.kv_bits != OFF:
                kvq = KVQuantizer(cfg.kv_bits, cfg.kv_sym, cfg.kv_clip, cfg.k_hadamard, backend)
                for name, module in kv_sites(base).items():
                    if only is None or only(name):
                        kv_saved.append((module, module.kv_quantizer))
                        module.kv_quantizer = kvq
        yield model
    finally:
        for module, previous in reversed(kv_saved):
            module.kv_quantizer = previous
        for site in reversed(installed):
            setattr(site.parent, site.attr, site.linear)


def _build_wrapper(
    cfg: QuantConfig, site: _Site, backend: str | None, absmax: float | None = None,
    folded: FoldedScales | None = None,
) -> tuple[QuantLinear, torch.Tensor | None]:
    """The QuantLinear for one site (with the smoothing `folded` in), and (GPTQ only) the fp32 weight GPTQ
    starts from."""
    rotate = cfg.down_hadamard and site.attr == "down_proj"
    act = _act_quant(cfg, site, absmax)
    smooth = folded.inputs.get(site.name) if folded is not None else None
    smoothed = folded is not None and (site.name in folded.columns or site.name in folded.rows)
    if cfg.w_bits == OFF:
        dense = (
            _effective_weight(cfg, site, rotate, folded).to(site.linear.weight.dtype)
            if rotate or smoothed
            else _full_weight(site.linear)
        )
        return QuantLinear(site.linear, dense, act, rotate, backend, smooth), None
    w_eff = _effective_weight(cfg, site, rotate, folded)
    if cfg.w_method == "gptq":
        # Calibration runs on the fp weights with input quantization off; GPTQ then sets the codes.
        wrapper = QuantLinear(site.linear, w_eff.to(site.linear.weight.dtype), act, rotate, backend, smooth)
        wrapper.quantize_input = False
        return wrapper, w_eff
    wrapper = QuantLinear(site.linear, None, act, rotate, backend, smooth)
    wrapper.set_qweight(
        quantize_weight(w_eff, cfg.w_bits, cfg.w_mse, cfg.w_mse_grid, cfg.w_mse_maxshrink, cfg.w_mse_norm)
    )
    return wrapper, None


# ---------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def nll_stats(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, num_valid: int | None = None
) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) over blocks (N, T+1), in eval mode.

    Only the first `num_valid` blocks count; the rest still run through the model, so that every rank of a
    sharded model issues the same number of forward passes (their collectives must pair up).
    """
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be a LongTensor (N, T+1) with T >= 1, got shape {tuple(blocks.shape)}")
    num_valid = blocks.shape[0] if num_valid is None else num_valid
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            logits = model(batch[:, :-1])
            keep = max(0, min(batch.shape[0], num_valid - start))
            if keep == 0:
                continue
            targets = batch[:keep, 1:]
            nll = F.cross_entropy(
                logits[:keep].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += targets.numel()
    return total, count


def perplexity(
    model: nn.Module,
    blocks: torch.Tensor,
    quant: QuantConfig | str | None = None,
    batch_size: int = 8,
    calib_blocks: torch.Tensor | None = None,
    backend: str | None = None,
) -> float:
    """exp(token-weighted mean NLL) of the model on blocks (N, T+1); under the W4A4 view when quant is
    given."""
    if quant is None:
        total, count = nll_stats(model, blocks, batch_size)
    else:
        with quantized(model, quant, calib_blocks=calib_blocks, calib_batch_size=batch_size, backend=backend):
            total, count = nll_stats(model, blocks, batch_size)
    return math.exp(total / count)
