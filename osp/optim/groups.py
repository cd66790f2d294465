"""Parameter routing by role, and the one optimizer that Lightning sees.

The model labels each parameter ("embedding" | "head" | "matrix" | "gain" | "bias"); `optim.routing`
maps each label to an algorithm. Every role becomes one param group named after it, carrying an
`algorithm` key, so a single optimizer (and a single LambdaLR) covers the whole model while each
group keeps its own lr, betas and weight decay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from osp.optim.config import DECAYED_ROLES, ROLES, optim_config
from osp.optim.muon import Muon
from osp.optim.root import ROOT

MATRIX_OPTIMIZERS = {"muon": Muon, "root": ROOT}


def _params_by_role(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    roles = model.parameter_roles()
    by_role: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
    # named_parameters() lists a tied (shared) parameter once, under its first name.
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = roles.get(name)
        if role is None:
            raise KeyError(f"parameter {name!r} has no role in model.parameter_roles()")
        if role not in by_role:
            raise ValueError(f"parameter {name!r} has role {role!r}; known roles: {', '.join(ROLES)}")
        by_role[role].append(p)
    return by_role


def param_groups(model: nn.Module, cfg: Any) -> list[dict[str, Any]]:
    """One param group per non-empty role, with the algorithm and hyperparameters routing gives it."""
    c = optim_config(cfg)
    groups = []
    for role, params in _params_by_role(model).items():
        if not params:
            continue
        algorithm = c["routing"][role]
        if algorithm == "adamw":
            group = {
                "lr": c["adamw_lr"],
                "betas": c["adamw_betas"],
                "eps": c["eps"],
                "weight_decay": c["adamw_weight_decay"] if role in DECAYED_ROLES else 0.0,
            }
        else:
            group = {
                "lr": c["lr"],
                "weight_decay": c["weight_decay"] if role in DECAYED_ROLES else 0.0,
                "momentum": c["momentum"],
                "nesterov": c["nesterov"],
                "ns_steps": c["ns_steps"],
                "ns_dtype": c["ns_dtype"],
                "update_scale": c["update_scale"],
            }
            if algorithm == "root":
                group.update(clip_quantile=c["clip_quantile"], clip_eps=c["clip_eps"])
        groups.append({"params": params, "name": role, "algorithm": algorithm, **group})
    return groups


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """ONE optimizer for the model per the `optim` node: torch AdamW, or Muon/ROOT with AdamW groups inside."""
    c = optim_config(cfg)
    groups = param_groups(model, c)
    if c["name"] == "adamw":
        # Extra group keys (name, algorithm) are kept by torch optimizers and read by describe_groups.
        return torch.optim.AdamW(groups, lr=c["lr"], betas=c["betas"], eps=c["eps"], weight_decay=c["weight_decay"])
    extra = {"fit_missing": c["ns_fit"] == "fitted"} if c["name"] == "root" else {}
    return MATRIX_OPTIMIZERS[c["name"]](groups, lr=c["lr"], weight_decay=c["weight_decay"], **extra)


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    """A small table: group, algorithm, #tensors, #params, lr, wd (one row per param group, then a total)."""
    default_algorithm = "adamw" if isinstance(optimizer, torch.optim.AdamW) else type(optimizer).__name__.lower()
    header = f"{'group':<12}{'algorithm':<11}{'tensors':>8}{'params':>14}{'lr':>11}{'wd':>10}"
    lines = [header, "-" * len(header)]
    total_tensors = total_params = 0
    for i, g in enumerate(optimizer.param_groups):
        n_tensors = len(g["params"])
        n_params = sum(p.numel() for p in g["params"])
        total_tensors += n_tensors
        total_params += n_params
        lr = g.get("initial_lr", g["lr"])
        lines.append(
            f"{str(g.get('name', i)):<12}{g.get('algorithm', default_algorithm):<11}{n_tensors:>8}"
            f"{n_params:>14,}{lr:>11.2e}{g.get('weight_decay', 0.0):>10.2e}"
        )
    lines.append("-" * len(header))
    lines.append(f"{'total':<23}{total_tensors:>8}{total_params:>14,}")
    return "\n".join(lines)
