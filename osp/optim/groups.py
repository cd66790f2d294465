"""Parameters by role, and the table of the optimizer's param groups.

The model labels each parameter ("embedding" | "head" | "matrix" | "gain" | "bias"); `optim.routing`
maps each label to an algorithm (osp.optim.config). Every role becomes one param group named after it,
carrying an `algorithm` key, so a single optimizer (and a single LambdaLR) covers the whole model while
each group keeps its own lr, betas and weight decay.
"""

from __future__ import annotations

import torch
from torch import nn

from osp.model.transformer import ROLES

# Roles that get weight decay by default (optim.decayed_roles); gains and biases do not: decaying a norm gain
# towards 0 fights the norm.
DECAYED_ROLES = ("embedding", "head", "matrix")


def params_by_role(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every trainable parameter under its role from `model.parameter_roles()` (a tied one listed once)."""
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


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    """A small table: group, algorithm, #tensors, #params, lr, wd (one row per param group, then a total)."""
    default_algorithm = ("adamw" if isinstance(optimizer, torch.optim.AdamW)
                         else type(optimizer).__name__.lower())
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
