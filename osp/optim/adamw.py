"""The AdamW update used for the AdamW param groups inside Muon and ROOT (same math as torch.optim.AdamW)."""

from __future__ import annotations

import math
from typing import Any

import torch

from osp.optim.distributed import local


@torch.no_grad()
def adamw_step(group: dict[str, Any], state: dict[torch.Tensor, dict[str, Any]]) -> None:
    """One decoupled-weight-decay Adam step on the params of `group` that have a gradient.

    θ ← θ(1 − lr·wd) − lr/(1−β1ᵗ) · m / (sqrt(v/(1−β2ᵗ)) + eps). Elementwise, so on FSDP2 shards
    it runs on the local shard. State per param: step (a float32 scalar tensor, as torch stores it),
    exp_avg, exp_avg_sq.
    """
    params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        s = state[p]
        if not s:
            s["step"] = torch.tensor(0.0)
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        s["step"] += 1
        params.append(local(p))
        grads.append(local(p.grad))
        exp_avgs.append(local(s["exp_avg"]))
        exp_avg_sqs.append(local(s["exp_avg_sq"]))
        steps.append(int(s["step"].item()))
    if not params:
        return
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    if wd != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**t) for t in steps])
