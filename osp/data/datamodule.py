"""`PretrainDataModule`: the LightningDataModule over a `TokenPipeline` (osp.data.pipeline) — rank, resume
state.

    dm = PretrainDataModule(TokenPipeline(DataConfig.from_dict(cfg.data)))      # what `osp train` does
    trainer.fit(module, datamodule=dm)

Everything about the data itself (tokenizer, shards, held-out blocks, the batch order) is the pipeline's;
this module only adds what Lightning needs: the rank and world size from the trainer, the dataloaders,
and the resume state.

Resuming. The only state is the number of training batches the loop has consumed. It is counted
in `on_after_batch_transfer`, which Lightning calls for the batch it is about to train on, i.e.
after any DataLoader or Lightning prefetching, so prefetched-but-unused batches are not counted.
`state_dict()` (saved by Lightning in every checkpoint) stores it and `load_state_dict()` restores
it; the next iterator starts at exactly that batch. Pass the module as `trainer.fit(...,
datamodule=dm)`, not its dataloaders, or Lightning will not call these hooks.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedTokenizerFast

from osp.data.pipeline import TokenPipeline, TrainProgress


class ResumableDataLoader(DataLoader):
    """The train DataLoader, whose position is its DataModule's consumed-batch counter.

    Having `state_dict`/`load_state_dict` marks it as resumable for Lightning, which then also stores
    the position with its loop state and restores it (to the same value) on resume.
    """

    def __init__(self, dataset: IterableDataset, owner: PretrainDataModule, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.owner = owner

    def state_dict(self) -> dict[str, Any]:
        return self.owner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.owner.load_state_dict(state_dict)


class PretrainDataModule(L.LightningDataModule):
    """Lightning's view of a `TokenPipeline`. world_size/rank: normally taken from the trainer or
    torch.distributed; pass both to override (tests, tools that shard by hand)."""

    def __init__(self, pipeline: TokenPipeline, *, world_size: int | None = None,
                 rank: int | None = None) -> None:
        super().__init__()
        if (world_size is None) != (rank is None):
            raise ValueError("world_size and rank go together (or leave both unset)")
        self.pipeline = pipeline
        self.save_hyperparameters(pipeline.config.to_dict())
        self._dist_override = None if world_size is None else (int(rank), int(world_size))  # type: ignore[arg-type]
        self.progress = TrainProgress()
        self._global_batch: int | None = None
        self._resumed_global_batch: int | None = None

    # What the callbacks read from `trainer.datamodule` (the export's tokenizer, the monitors' blocks).
    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self.pipeline.tokenizer

    def heldout_blocks(self, n: int) -> torch.Tensor:
        return self.pipeline.heldout_blocks(n)

    def prepare_data(self) -> None:
        """Fetch the corpus and build tokenizer and shards (Lightning: once per node, before setup)."""
        self.pipeline.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.pipeline.prepare()  # loads from the cache; builds only if prepare_data did not run here

    def val_dataloader(self) -> DataLoader:
        # No workers: reading a few memmapped blocks is cheaper than starting processes each validation.
        return DataLoader(self.pipeline.val_dataset(), batch_size=self.pipeline.batch_size, shuffle=False,
                          num_workers=0, pin_memory=self.pipeline.config.pin_memory)

    def _rank_world(self) -> tuple[int, int]:
        if self._dist_override is not None:
            return self._dist_override
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def train_dataloader(self) -> ResumableDataLoader:
        rank, world = self._rank_world()
        self._global_batch = self.pipeline.batch_size * world
        self._reconcile_resume()
        dataset = self.pipeline.train_dataset(rank, world, self.progress)
        # Lightning warns about any IterableDataset with a length (naive multi-worker use duplicates
        # data); ours gives each worker its own batches, so the length is exact.
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined",
                                category=UserWarning)
        return ResumableDataLoader(dataset, self, num_workers=self.pipeline.train_workers(),
                                   pin_memory=self.pipeline.config.pin_memory)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this for the batch it is about to run, after all prefetching.
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self.progress.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_batches": self.progress.consumed, "global_batch_size": self._global_batch,
                "seed": self.pipeline.config.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.progress.consumed = int(state_dict["consumed_batches"])
        self._resumed_global_batch = state_dict.get("global_batch_size")
        seed = self.pipeline.config.seed
        if state_dict.get("seed", seed) != seed:
            warnings.warn(f"resuming with data seed {seed} instead of {state_dict['seed']}: the "
                          "remaining batches follow the new seed's order and may repeat or skip blocks",
                          stacklevel=2)
        self._reconcile_resume()

    def _reconcile_resume(self) -> None:
        """Map the restored position onto a different global batch size (e.g. another world size)."""
        saved, current = self._resumed_global_batch, self._global_batch
        if saved is None or current is None:
            return
        self._resumed_global_batch = None
        if saved != current:
            blocks = self.progress.consumed * saved
            self.progress.consumed = blocks // current
            warnings.warn(f"resuming with a global batch of {current} blocks instead of {saved}: continuing "
                          f"after block {blocks} of the schedule as batch {self.progress.consumed}; exact "
                          "continuation needs the same batch_size x world_size", stacklevel=2)
