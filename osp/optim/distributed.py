"""Sharing the Newton–Schulz work over data-parallel ranks (DDP, or FSDP2 with DTensor parameters).

Gradients reach the optimizer already averaged over ranks (DDP all-reduce; FSDP2 reduce-scatter),
and every rank keeps the full optimizer state for what it holds, so the elementwise work (momentum,
weight decay, AdamW) is simply repeated. Only the expensive part — orthogonalizing whole matrices —
is split: each rank orthogonalizes its share of a bucket of same-shape matrices and the results are
all-gathered. gloo's all_gather needs equal sizes, hence same-shape buckets padded with zero
matrices to a multiple of the world size (a zero matrix orthogonalizes to zero, cheaply).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]


def world_size() -> int:
    """Number of ranks sharing the optimizer step (1 when torch.distributed is not initialized)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_dtensor(t: Tensor) -> bool:
    """Whether t is a DTensor (an FSDP2 / fully_shard parameter or gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The part of t stored on this rank: the local shard of a DTensor, else t itself (in-place ops reach
    t)."""
    return t.to_local() if is_dtensor(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor on every rank (all-gathers a DTensor's shards; a no-op for a plain tensor)."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of `whole` laid out as the DTensor `like` (no communication: every rank has
    `whole`)."""
    if not is_dtensor(like):
        return whole
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


def sharded_map(matrices: list[Tensor], fn: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """[fn(stack(matrices))[i]] with the batch split over ranks; all matrices have one shape.

    Rank r computes the contiguous chunk r of the (zero-padded) batch; the chunks are all-gathered,
    so every rank returns all results. fn maps a batch (k, m, n) to (k, m, n) and must be deterministic.
    """
    ranks = world_size()
    if ranks == 1:
        return list(fn(torch.stack(matrices)).unbind(0))
    chunk = -(-len(matrices) // ranks)
    mine = matrices[dist.get_rank() * chunk : (dist.get_rank() + 1) * chunk]
    batch = torch.zeros((chunk, *matrices[0].shape), dtype=matrices[0].dtype, device=matrices[0].device)
    if mine:
        batch[: len(mine)] = torch.stack(mine)
    out = fn(batch).contiguous()
    gathered = [torch.empty_like(out) for _ in range(ranks)]
    dist.all_gather(gathered, out)
    return list(torch.cat(gathered).unbind(0))[: len(matrices)]
