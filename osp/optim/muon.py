"""Muon: momentum orthogonalized by Newton–Schulz, with AdamW param groups in the same optimizer.

One torch.optim.Optimizer whose param groups carry an `algorithm` key ("muon" or "adamw"), so
Lightning sees a single optimizer and one LambdaLR scales every group from its own base lr.
ROOT subclasses this class and changes only how a momentum matrix becomes a direction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from osp.errors import ConfigError
from osp.optim.adamw import adamw_step
from osp.optim.distributed import full, is_dtensor, local, shard_like, sharded_map, world_size
from osp.optim.newton_schulz import AUTO, MUON_COEFFICIENTS, newton_schulz, resolve_dtype

UPDATE_SCALES = ("moonlight", "keller")
# Most matrix elements orthogonalized in one batched Newton–Schulz call (2**28 fp32 = 1 GiB per copy).
BATCH_ELEMENTS = 2**28


def matrix_view_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The 2-D shape a parameter is orthogonalized as: (shape[0], rest) for ndim ≥ 2, a (1, numel) row
    below."""
    numel = math.prod(shape)
    if len(shape) < 2:
        return (1, numel)
    return (shape[0], numel // shape[0])


def update_scale(shape: torch.Size | tuple[int, ...], rule: str) -> float:
    """Factor on the orthogonalized update of a parameter of `shape`.

    moonlight: 0.2·sqrt(max(m, n)) — gives the update an RMS of about 0.2, like AdamW's, so AdamW's lr
    and weight decay carry over (Moonlight, OSP). keller: sqrt(max(1, m/n)) (Keller Jordan's Muon).
    """
    m, n = matrix_view_shape(shape)
    if rule == "moonlight":
        return 0.2 * math.sqrt(max(m, n))
    if rule == "keller":
        return math.sqrt(max(1.0, m / n))
    raise ConfigError(f"update_scale={rule!r} is not supported; allowed: {', '.join(UPDATE_SCALES)}")


class Muon(torch.optim.Optimizer):
    """Muon for groups with algorithm "muon", AdamW for groups with algorithm "adamw".

    Muon step per matrix W (ndim > 2 viewed as (shape[0], -1)):
        buf ← β·buf + g;  u = g + β·buf (nesterov) or buf;  O = NS5(u)
        W ← W·(1 − lr·wd) − lr·scale·O     (scale per `update_scale`; decoupled weight decay)
    A parameter with ndim < 2 routed here gets u/‖u‖₂ instead of NS5(u) (what OSP's Muon does with
    norm scales; the orthogonalization of a single row), scaled as a (1, numel) row.

    Groups without an `algorithm` key are Muon groups. AdamW groups use lr, betas, eps, weight_decay.
    Under torch.distributed (DDP or FSDP2/DTensor parameters) every rank must call step(); the
    Newton–Schulz work is split over ranks (see osp.optim.distributed). A parameter without a gradient
    is left untouched, as torch optimizers do; under torch.distributed it still fills its slot in the
    collectives (with zeros) so that all ranks stay in step.
    """

    algorithm = "muon"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | str = "auto",
        update_scale: str = "moonlight",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        **extra_defaults: Any,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            update_scale=update_scale,
            betas=betas,
            eps=eps,
            algorithm=self.algorithm,
            **extra_defaults,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its algorithm and matrix settings."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        allowed = ("adamw", self.algorithm)
        if group["algorithm"] not in allowed:
            raise ConfigError(
                f"param group {group.get('name', len(self.param_groups) - 1)!r} has algorithm "
                f"{group['algorithm']!r}; {type(self).__name__} accepts: {', '.join(allowed)}"
            )
        if group["update_scale"] not in UPDATE_SCALES:
            raise ConfigError(
                f"update_scale={group['update_scale']!r} is not supported; "
                f"allowed: {', '.join(UPDATE_SCALES)}"
            )
        # Stored as a name (a torch.dtype becomes its name) so that param_groups stay plain data in
        # checkpoints; a name is checked and kept as given (`auto` is decided per device at each step).
        dtype = group["ns_dtype"]
        if isinstance(dtype, torch.dtype):
            group["ns_dtype"] = str(dtype).removeprefix("torch.")
        elif dtype != AUTO:
            resolve_dtype(dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of every group: AdamW groups elementwise, matrix groups through `_direction`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["algorithm"] == "adamw":
                adamw_step(group, self.state)
        self._matrix_step([g for g in self.param_groups if g["algorithm"] == self.algorithm])
        return loss

    def _matrix_step(self, groups: list[dict[str, Any]]) -> None:
        sharing = world_size() > 1
        # Momentum is elementwise and cheap: every rank keeps it for every parameter it holds (a local
        # shard under FSDP2), so rank 0's state_dict is complete and a resumed run is exact.
        work: list[tuple[int, Tensor, Tensor, bool]] = []
        for gi, group in enumerate(groups):
            beta = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    if sharing:
                        # Every rank must join the same collectives: a zero matrix takes this parameter's
                        # slot, and the parameter and its state are left alone, as on one process.
                        work.append((gi, p, torch.zeros_like(p), False))
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.mul_(beta).add_(p.grad)
                u = p.grad.add(buf, alpha=beta) if group["nesterov"] else buf
                work.append((gi, p, u, True))

        # Same-shape matrices of one group form a bucket: one batched Newton–Schulz call, shared over ranks.
        buckets: dict[tuple[int, tuple[int, int], bool], list[int]] = {}
        for i, (gi, p, _, _) in enumerate(work):
            buckets.setdefault((gi, matrix_view_shape(p.shape), p.ndim < 2), []).append(i)
        directions: list[Tensor | None] = [None] * len(work)
        for (gi, shape, vector), indices in buckets.items():
            group = groups[gi]
            # Batches are capped so that the stacked fp32 copy (and the NS temporaries) stay bounded.
            per_batch = max(1, BATCH_ELEMENTS // (shape[0] * shape[1]))
            for start in range(0, len(indices), per_batch):
                chunk = indices[start : start + per_batch]
                matrices = [full(work[i][2]).reshape(shape).float() for i in chunk]
                outs = sharded_map(matrices, lambda X, g=group, v=vector: self._direction(X, g, v))
                for i, out in zip(chunk, outs):
                    directions[i] = out

        for (gi, p, _, has_grad), d in zip(work, directions):
            if not has_grad:
                continue
            group = groups[gi]
            lr, wd = group["lr"], group["weight_decay"]
            d = shard_like(d.reshape(p.shape), p) if is_dtensor(p) else d.reshape(p.shape)
            p_local = local(p)
            if wd != 0.0:
                p_local.mul_(1.0 - lr * wd)
            p_local.add_(d.to(p_local.dtype), alpha=-lr * update_scale(p.shape, group["update_scale"]))

    def _direction(self, X: Tensor, group: dict[str, Any], vector: bool) -> Tensor:
        """Update direction for a batch (k, m, n) of fp32 momentum matrices; rows (k, 1, n) if `vector`."""
        X = self._robust(X, group)
        if vector:
            return X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + 1e-8)
        coefficients = self._coefficients(X.shape[-2:])
        return newton_schulz(X, steps=group["ns_steps"], coefficients=coefficients, dtype=group["ns_dtype"])

    def _robust(self, X: Tensor, group: dict[str, Any]) -> Tensor:
        """Hook before orthogonalization; Muon uses the momentum as it is."""
        return X

    def _coefficients(self, shape: torch.Size) -> tuple[float, float, float]:
        """Newton–Schulz coefficients for a matrix of this shape; Muon's quintic for every shape."""
        return MUON_COEFFICIENTS
