"""Per-channel smoothing of linear inputs that the layer producing them absorbs exactly (SmoothQuant).

A linear y = x W^T reads x / s instead of x and has weight W diag(s): the same y, but channel j of its input
shrinks by s_j, so one large channel no longer sets the 4-bit grid of every token. The division by s costs
nothing at inference when it folds into whatever produces x:

- the down_proj input h = silu(gate(x)) * up(x): divide the rows of up_proj by s (h / s exactly);
- the input of q/k/v (or gate/up) is the output of an RMSNorm or SSNorm: divide its gain by s (an SSNorm
  scalar becomes a per-channel Llama RMSNorm weight).

s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) over every linear reading x (SmoothQuant, Xiao et al. 2023,
eq. 4), with max|x_j| from calibration text (the `+smooth` presets) or tracked while training
(`model.smooth_swiglu`).
GatedNorm and PreAffine outputs are not smoothed (their gate or scale sits after the gain), nor is the o_proj
input (the attention output).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from osp.model.norms import RMSNorm, SingleScaleRMSNorm

from .config import DEFAULT_ALPHA

FLOOR = 1e-5  # no scale (and no max it is computed from) below this


@dataclass(frozen=True)
class Smoothing:
    """One per-channel scale `scale` (C,) of a tensor read by the linear sites `readers`
    ("layers.0.mlp.down_proj"): folded by dividing dim 0 of the parameters `producers`
    ("layers.0.mlp.up_proj.weight") by it."""

    scale: torch.Tensor
    producers: tuple[str, ...]
    readers: tuple[str, ...]


@dataclass(frozen=True)
class SmoothGroup:
    """Linear sites reading one tensor, and the parameters (dim 0 = channels) that produce it."""

    producers: tuple[str, ...]
    readers: tuple[str, ...]


def smooth_scale(input_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max_i max_o |W_i[o, j]|^(1 - alpha), in fp32, at least FLOOR."""
    w_absmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    scale = input_absmax.float().clamp_min(FLOOR).pow(alpha) / w_absmax.clamp_min(FLOOR).pow(1.0 - alpha)
    return scale.clamp_min(FLOOR)


def _layers(model: nn.Module) -> nn.ModuleList:
    return getattr(model, "_orig_mod", model).layers


def down_proj_groups(model: nn.Module) -> list[SmoothGroup]:
    """The down_proj input of every SwiGLU block, produced by (the rows of) its up_proj."""
    return [SmoothGroup((f"layers.{i}.mlp.up_proj.weight",), (f"layers.{i}.mlp.down_proj",))
            for i, block in enumerate(_layers(model)) if hasattr(block.mlp, "up_proj")]


@torch.no_grad()
def smooth_groups(model: nn.Module) -> list[SmoothGroup]:
    """Every foldable group of the model: each block's down_proj input, and the linears reading the output of
    a plain RMSNorm/SSNorm gain (found by one forward of two tokens: which linears read the norm's output)."""
    groups = down_proj_groups(model)
    device = next(model.parameters()).device
    for i, block in enumerate(_layers(model)):
        for norm_name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(block, norm_name)
            if type(norm) not in (RMSNorm, SingleScaleRMSNorm):
                continue
            readers = _readers_of(block, norm, model, device)
            if readers:
                groups.append(SmoothGroup((f"layers.{i}.{norm_name}.weight",),
                                          tuple(f"layers.{i}.{name}" for name in readers)))
    return groups


def _readers_of(block: nn.Module, norm: nn.Module, model: nn.Module, device: torch.device) -> list[str]:
    produced: list[torch.Tensor] = []
    readers: list[str] = []
    hooks = [norm.register_forward_hook(lambda _m, _a, out: produced.append(out))]
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: readers.append(name) if any(args[0] is t for t in produced)
                else None))
    try:
        was_training = model.training
        model.eval()
        model(torch.zeros(1, 2, dtype=torch.long, device=device))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    return readers


def _site_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {f"layers.{i}.{name}": m for i, block in enumerate(_layers(model))
            for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def _dense(weight: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(weight, "full_tensor", None)  # a DTensor (FSDP2): gathered, every rank calls this
    return (full_tensor() if callable(full_tensor) else weight).detach()


def scaled(group: SmoothGroup, input_absmax: torch.Tensor, model: nn.Module, alpha: float) -> Smoothing:
    """The Smoothing of `group` for the input's per-channel max `input_absmax`."""
    sites = _site_modules(model)
    weights = [_dense(sites[reader].weight) for reader in group.readers]
    return Smoothing(smooth_scale(input_absmax, weights, alpha), group.producers, group.readers)


def trained_smoothing(model: nn.Module) -> list[Smoothing]:
    """The down_proj smoothing a `model.smooth_swiglu` model carries: from the per-channel max of the SwiGLU
    output it tracked while training (empty for other models, and before the first training step)."""
    out = []
    for group, block in zip(down_proj_groups(model), _layers(model)):
        amax = getattr(block.mlp, "output_absmax", None)
        if amax is not None and bool((amax > 0).any()):
            out.append(scaled(group, amax, model, DEFAULT_ALPHA))
    return out


def reader_scales(smoothings: list[Smoothing]) -> dict[str, torch.Tensor]:
    """{linear site name: the scale its input is divided by} (what the readers see once folded)."""
    return {reader: s.scale for s in smoothings for reader in s.readers}


@dataclass
class FoldedScales:
    """How the W4A4 view computes a folded model without touching it, per linear site: its input divided by
    `inputs[site]` (the producer is a norm gain, which the view does not quantize), its weight columns
    multiplied by `columns[site]`, its weight rows divided by `rows[site]` (it is the producer: up_proj).
    A producer linear is quantized with its rows already divided, as the exported model's would be."""

    inputs: dict[str, torch.Tensor]
    columns: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor]


def folded_scales(smoothings: list[Smoothing], sites: set[str]) -> FoldedScales:
    """`FoldedScales` of `smoothings` for a model whose linear sites are `sites`."""
    out = FoldedScales({}, {}, {})
    for smoothing in smoothings:
        producer_sites = [name.removesuffix(".weight") for name in smoothing.producers]
        by_linear = all(name in sites for name in producer_sites)
        for name in producer_sites if by_linear else ():
            out.rows[name] = smoothing.scale
        for reader in smoothing.readers:
            out.columns[reader] = smoothing.scale
            if not by_linear:
                out.inputs[reader] = smoothing.scale
    return out


def fold_into_state(state: dict[str, torch.Tensor], smoothings: list[Smoothing]) -> Iterator[str]:
    """Fold each Smoothing into a state dict in osp names (norm gains as Llama vectors): producers' dim 0
    divided by s, readers' weight columns multiplied by s, in fp64; yields the names it changed."""
    for smoothing in smoothings:
        s = smoothing.scale.double()
        for name in smoothing.producers:
            tensor = state[name]
            shape = (-1,) + (1,) * (tensor.dim() - 1)
            state[name] = (tensor.double() / s.to(tensor.device).view(shape)).to(tensor.dtype)
            yield name
        for reader in smoothing.readers:
            name = f"{reader}.weight"
            tensor = state[name]
            state[name] = (tensor.double() * s.to(tensor.device)).to(tensor.dtype)
            yield name
