"""Parallelism applied from outside the model: FSDP2 sharding, activation checkpointing, the FSDP2 strategy.

`LanguageModelModule.configure_model` calls `apply_activation_checkpointing` (any strategy) and, under
`FSDP2Strategy` (`trainer=fsdp`), `apply_fsdp`. The Transformer itself never
learns about either: both are composable APIs that keep parameter names, so optimizer routing,
the metric callbacks, checkpoints and export see the same names as on one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from osp.atomic import remove_path, replace_path
from osp.errors import ConfigError
from osp.model import Transformer
from osp.precision import DTYPES


def parse_dtype(value: str | torch.dtype | None, key: str) -> torch.dtype | None:
    """A torch dtype from a config string (None stays None: 'as stored')."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if str(value) not in DTYPES:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {sorted(DTYPES)} or null")
    return DTYPES[str(value)]


@dataclass(frozen=True)
class FSDPOptions:
    """How FSDP2 shards the model: per-Block units plus the root (embedding, final norm, head).

    param_dtype: dtype parameters are all-gathered and computed in (None: as stored, fp32).
    reduce_dtype: dtype of the gradient reduce-scatter (fp32 keeps the sum exact enough for long runs).
    reshard_after_forward: free gathered block weights after forward (ZeRO-3) instead of keeping
    them until backward (less communication, more memory).
    """

    param_dtype: torch.dtype | None = torch.bfloat16
    reduce_dtype: torch.dtype | None = torch.float32
    reshard_after_forward: bool = True


def apply_fsdp(model: Transformer, mesh: Any, options: FSDPOptions) -> None:
    """Shard every Block, then the root, over `mesh` (a 1-D data-parallel DeviceMesh)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=options.param_dtype, reduce_dtype=options.reduce_dtype)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=options.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=options.reshard_after_forward)


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each Block's activations in backward instead of storing them.

    The composable `checkpoint` hooks the Block without wrapping it, so parameter names (and with
    them optimizer routing, checkpoints and export) stay as they are; applied before FSDP2, as
    FSDP2 expects.
    """
    from torch.distributed._composable import checkpoint

    for block in model.layers:
        checkpoint(block)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 already manages `model` (configure_model may be called once per trainer stage)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy set up for pure data-parallel FSDP2, as `trainer=fsdp` uses it.

    - The device mesh is 1-D data parallel over all ranks (ModelParallelStrategy's default would make
      every GPU of a node a tensor-parallel rank).
    - The FSDP2 options (mixed precision, resharding) travel with the strategy, so the config group
      `trainer=fsdp` holds everything about it; `LanguageModelModule.configure_model` reads them.
    - Distributed checkpoints (one folder, a shard per rank) are written to `<name>.tmp` and moved
      into place when complete, so a job killed mid-save leaves the previous checkpoint intact.
    """

    def __init__(self, param_dtype: str | None = "bf16", reduce_dtype: str | None = "fp32",
                 reshard_after_forward: bool = True, save_distributed_checkpoint: bool = True,
                 **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.fsdp_options = FSDPOptions(
            param_dtype=parse_dtype(param_dtype, "trainer.strategy.param_dtype"),
            reduce_dtype=parse_dtype(reduce_dtype, "trainer.strategy.reduce_dtype"),
            reshard_after_forward=bool(reshard_after_forward),
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._save_distributed_checkpoint:  # one file through the (atomic) CheckpointIO
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final = Path(self.broadcast(str(filepath)))
        staging = final.with_name(final.name + ".tmp")
        if self.is_global_zero:
            remove_path(staging)  # left over from a save that was killed
        self.barrier()
        super().save_checkpoint(checkpoint, staging, storage_options)
        # DCP returns on rank 0 only after every rank has written its shard; meta.pt is rank 0's own.
        if self.is_global_zero:
            replace_path(staging, final)
        self.barrier()


def fsdp_options_of(strategy: Any) -> FSDPOptions | None:
    """The FSDP2 options when `strategy` shards the model (None for DDP and single-device strategies)."""
    if isinstance(strategy, FSDP2Strategy):
        return strategy.fsdp_options
    if isinstance(strategy, ModelParallelStrategy):
        # Its default mesh makes the GPUs of a node tensor-parallel ranks, which osp does not apply:
        # each of them would train its own copy.
        raise ConfigError("trainer.strategy: Lightning's ModelParallelStrategy is not supported as it is; "
                          "use trainer=fsdp (osp.training.parallel.FSDP2Strategy)")
    return None
