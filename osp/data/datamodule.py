"""`PretrainDataModule`: source -> tokenizer -> packed blocks -> per-rank, resumable batches.

Batches are LongTensor (batch_size, seq_len + 1); the model reads input = [:, :-1], target = [:, 1:].
`seq_len` and `batch_size` are per rank and per micro-batch: one optimizer step sees
batch_size × world_size × accumulate_grad_batches sequences.

Training order (pre-tokenized sources: demo, files). Global batch b (counted across epochs) is a
pure function of (seed, b): epoch e = b // batches_per_epoch takes a permutation of all blocks
seeded by (seed, e); its b-th slice of batch_size × world_size blocks is split rank-strided, so
rank r gets slice[r::world_size]. Ranks never share a block and every epoch uses every block at
most once (the remainder of an epoch that does not fill a global batch is skipped).

Resuming. The only state is the number of training batches the loop has consumed. It is counted
in `on_after_batch_transfer`, which Lightning calls for the batch it is about to train on, i.e.
after any DataLoader or Lightning prefetching, so prefetched-but-unused batches are not counted.
`state_dict()` (saved by Lightning in every checkpoint) stores it and `load_state_dict()` restores
it; the next iterator starts at exactly that batch. Pass the module as `trainer.fit(...,
datamodule=dm)`, not its dataloaders, or Lightning will not call these hooks.

Streaming (hub) sources are read in stored order: documents -> tokens -> blocks on the fly, each
rank reading its own share of the documents; on resume the stream is replayed and the consumed
batches are skipped. The train loader is then endless (use `max_steps`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerFast

from osp.data.cache import cache_root, fingerprint
from osp.data.packing import PackedBlocks, TokenShard, cached_shard, pack_stream, require_blocks
from osp.data.sources import DataError, HubDataset, LocalFiles, Split, TextSource, build_source
from osp.data.tokenizer import (DocumentEncoder, build_tokenizer, token_dtype, tokenizer_fingerprint,
                                vocab_size_of)

# Held-out blocks are drawn with a fixed seed, not the run's seed, so that runs with different
# seeds are evaluated on the same text.
HELDOUT_SEED = 0


class TrainProgress:
    """The number of training batches consumed so far (shared by the DataModule and its datasets)."""

    def __init__(self) -> None:
        self.consumed = 0


class BatchSchedule:
    """Which blocks make up global batch `b` on this rank (see the module docstring)."""

    def __init__(self, num_blocks: int, batch_size: int, world_size: int, rank: int, seed: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_blocks, self.batch_size, self.world_size, self.rank, self.seed = (
            num_blocks, batch_size, world_size, rank, seed)
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = num_blocks // self.global_batch
        self._epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
            self._epoch = epoch
        return self._permutation

    def blocks(self, batch: int) -> np.ndarray:
        """Block numbers of this rank's micro-batch for global batch number `batch`."""
        epoch, pos = divmod(batch, self.batches_per_epoch)
        chunk = self.permutation(epoch)[pos * self.global_batch : (pos + 1) * self.global_batch]
        return chunk[self.rank :: self.world_size]


def _worker_share() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ScheduledBatches(IterableDataset):
    """Yields this rank's micro-batches from the consumed-batch counter to the end of that epoch.

    DataLoader workers take every num_workers-th batch; the DataLoader interleaves them round-robin,
    which restores the schedule's order.
    """

    def __init__(self, blocks: PackedBlocks, schedule: BatchSchedule, progress: TrainProgress) -> None:
        self.blocks, self.schedule, self.progress = blocks, schedule, progress

    def __len__(self) -> int:
        return self.schedule.batches_per_epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        # Read once, when the DataLoader starts this iteration (workers get a snapshot of it).
        start = self.progress.consumed
        end = (start // self.schedule.batches_per_epoch + 1) * self.schedule.batches_per_epoch
        worker, workers = _worker_share()
        for batch in range(start + worker, end, workers):
            yield self.blocks.take(self.schedule.blocks(batch))


class StreamedBatches(IterableDataset):
    """This rank's micro-batches from a streamed source, packed on the fly; loops over epochs forever."""

    def __init__(self, source: HubDataset, encoder: DocumentEncoder, eos_id: int, block_len: int,
                 batch_size: int, rank: int, world_size: int, progress: TrainProgress) -> None:
        self.source, self.encoder, self.eos_id = source, encoder, eos_id
        self.block_len, self.batch_size, self.rank, self.world_size = block_len, batch_size, rank, world_size
        self.progress = progress

    def _epoch_batches(self) -> Iterator[list[np.ndarray]]:
        batch: list[np.ndarray] = []
        docs = self.source.stream("train", rank=self.rank, world_size=self.world_size)
        for block in pack_stream(self.encoder.encode(docs), self.block_len, self.eos_id):
            batch.append(block)
            if len(batch) == self.batch_size:
                yield batch
                batch = []

    def __iter__(self) -> Iterator[torch.Tensor]:
        if _worker_share()[0] != 0:  # one ordered stream: extra workers would duplicate it
            return
        skip = self.progress.consumed
        while True:
            produced = 0
            for batch in self._epoch_batches():
                produced += 1
                if skip:  # replaying consumed batches on resume: tokenized, never materialized
                    skip -= 1
                    continue
                yield torch.from_numpy(np.stack(batch))
            if produced == 0:
                raise DataError(f"rank {self.rank}'s share of {self.source.describe()} holds less than one "
                                f"micro-batch ({self.batch_size} blocks of {self.block_len} tokens)")


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
    """Pre-training data from plain config values (Hydra: `_target_: osp.data.datamodule.PretrainDataModule`).

    source: "demo" | "files" | "hub". demo: include_bible, deb_dir. files: paths (glob or list),
    val_paths or val_fraction, txt_documents ("file" | "paragraphs"). hub: name, config_name, split,
    val_split or val_docs, revision, data_files. files/hub: text_field.
    tokenizer: "bpe" (trained on the training split; `vocab_size` is its size, the single source of
    truth for the model's vocabulary — read it back from `dm.vocab_size`) or a pretrained name/path
    (`vocab_size` is then ignored). tokenizer_train_chars caps the BPE training text.
    seq_len, batch_size: per rank and micro-batch. val_blocks: held-out blocks in the validation loop
    (None: all). world_size/rank: normally taken from the trainer or torch.distributed.
    """

    def __init__(
        self,
        source: str = "demo",
        *,
        paths: str | Sequence[str] | None = None,
        val_paths: str | Sequence[str] | None = None,
        val_fraction: float = 0.01,
        txt_documents: Literal["file", "paragraphs"] = "file",
        name: str | None = None,
        config_name: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_docs: int = 1000,
        revision: str | None = None,
        data_files: Any = None,
        text_field: str = "text",
        include_bible: bool = True,
        deb_dir: str | None = None,
        tokenizer: str = "bpe",
        vocab_size: int = 4096,
        tokenizer_train_chars: int | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 1234,
        val_blocks: int | None = 64,
        cache_dir: str | None = None,
        world_size: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        for key, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                ("num_workers", num_workers, 0), ("val_blocks", val_blocks or 0, 0)):
            if int(value) < low:
                raise ValueError(f"data.{key} must be >= {low}, got {value}")
        if (world_size is None) != (rank is None):
            raise ValueError("data.world_size and data.rank go together (or leave both unset)")
        self.save_hyperparameters()
        self.source: TextSource = build_source(
            source, paths=paths, val_paths=val_paths, val_fraction=val_fraction, name=name,
            config_name=config_name, split=split, val_split=val_split, val_docs=val_docs, revision=revision,
            data_files=data_files, text_field=text_field, txt_documents=txt_documents,
            include_bible=include_bible, deb_dir=deb_dir, cache_dir=cache_dir)
        self.tokenizer_spec = tokenizer
        self.bpe_vocab_size = int(vocab_size)
        self.tokenizer_train_chars = tokenizer_train_chars
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.num_workers, self.pin_memory, self.seed = int(num_workers), bool(pin_memory), int(seed)
        self.val_blocks = val_blocks
        self.cache_dir = cache_dir
        self._dist_override = None if world_size is None else (int(rank), int(world_size))  # type: ignore[arg-type]
        self.progress = TrainProgress()
        self._tokenizer: PreTrainedTokenizerFast | None = None
        self._tokenizer_fp = ""
        self._vocab_size = 0
        self._source_fp = ""
        self._shards: dict[str, TokenShard] = {}
        self._global_batch: int | None = None
        self._resumed_global_batch: int | None = None

    # ----------------------------------------------------------------------------------------
    # building blocks (each cached on disk and in memory; safe to call from any rank)

    @property
    def block_len(self) -> int:
        return self.seq_len + 1

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The tokenizer (built or loaded from the cache on first access)."""
        if self._tokenizer is None:
            tokenizer = build_tokenizer(self.tokenizer_spec, self.source, self.bpe_vocab_size,
                                        max_train_chars=self.tokenizer_train_chars, cache_dir=self.cache_dir)
            self._tokenizer_fp = tokenizer_fingerprint(tokenizer)
            self._vocab_size = vocab_size_of(tokenizer)
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size: one more than the largest token id."""
        self.tokenizer  # noqa: B018 - built on first access
        return self._vocab_size

    def source_fingerprint(self) -> str:
        """A digest of the training text's identity (for local files: their paths, sizes and times)."""
        if not self._source_fp:  # once per module: for local files it stats every file
            self._source_fp = self.source.fingerprint()
        return self._source_fp

    def tokenizer_fingerprint(self) -> str:
        """A digest of the tokenizer (vocabulary, merges, special tokens); builds it on first use."""
        self.tokenizer  # noqa: B018 - built on first access
        return self._tokenizer_fp

    def shard_path(self, split: Split) -> Path:
        """Where the token shard of `split` lives: keyed by source content, tokenizer and split."""
        self.tokenizer  # noqa: B018 - sets the tokenizer fingerprint
        key = fingerprint("shard", self.source_fingerprint(), self._tokenizer_fp, split)[:16]
        return cache_root(self.cache_dir) / "shards" / f"{self.source.kind}-{split}-{key}.bin"

    def shard(self, split: Split) -> TokenShard:
        """The pre-tokenized split (built on first use, then loaded from the cache)."""
        if split == "train" and self.source.streaming:
            raise DataError(f"{self.source.describe()} is streamed: its training split has no shard")
        if split not in self._shards:
            tokenizer = self.tokenizer
            meta = {"source": self.source.describe(), "source_fingerprint": self.source_fingerprint(),
                    "tokenizer": self.tokenizer_spec, "tokenizer_fingerprint": self._tokenizer_fp,
                    "vocab_size": self.vocab_size, "split": split}
            docs = self._encoded_documents(split)  # lazy: consumed only on a cache miss
            self._shards[split] = cached_shard(self.shard_path(split), docs,
                                               dtype=token_dtype(self.vocab_size),
                                               eos_id=tokenizer.eos_token_id, meta=meta)
        return self._shards[split]

    def _encoded_documents(self, split: Split) -> Iterator[np.ndarray]:
        yield from DocumentEncoder(self.tokenizer).encode(self.source.documents(split))

    def _require(self, split: Split, needed: int, what: str = "one block") -> PackedBlocks:
        shard = self.shard(split)
        blocks = PackedBlocks(shard, self.block_len)
        hint = ""
        if split == "val" and isinstance(self.source, LocalFiles) and not self.source.val_paths:
            hint = f"data.val_fraction is {self.source.val_fraction}: raise it or set data.val_paths"
        require_blocks(len(blocks), needed, split=split, block_len=self.block_len,
                       num_tokens=shard.num_tokens, what=what, hint=hint)
        return blocks

    def prepare_data(self) -> None:
        """Fetch the corpus and build tokenizer and shards (Lightning: once per node, before setup)."""
        self.source.prepare()
        self._require("val", 1)
        if not self.source.streaming:
            self._require("train", 1)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # loads from the cache; builds only if prepare_data did not run here

    # ----------------------------------------------------------------------------------------
    # validation

    def _heldout_order(self) -> tuple[PackedBlocks, np.ndarray]:
        blocks = self._require("val", 1)
        return blocks, np.random.default_rng(HELDOUT_SEED).permutation(len(blocks))

    def heldout_blocks(self, n: int) -> torch.Tensor:
        """`n` validation blocks, LongTensor (n, seq_len + 1): the same on every call, rank and run seed."""
        blocks, order = self._heldout_order()
        self._require("val", n, what=f"the {n} held-out blocks asked for")
        return blocks.take(order[:n])

    def train_blocks(self, n: int) -> torch.Tensor:
        """`n` training blocks, LongTensor (n, seq_len + 1), evenly spaced over the training split:
        calibration data from the training distribution (GPTQ), never the held-out text."""
        if self.source.streaming:
            raise DataError("train_blocks needs a pre-tokenized source (demo or files), not a streaming one")
        blocks = self._require("train", n, what=f"the {n} calibration blocks asked for")
        return blocks.take(np.linspace(0, len(blocks) - 1, n).round().astype(np.int64))

    def val_dataloader(self) -> DataLoader:
        blocks, order = self._heldout_order()
        n = len(order) if self.val_blocks is None else min(self.val_blocks, len(order))
        # No workers: reading a few memmapped blocks is cheaper than starting processes each validation.
        return DataLoader(PackedBlocks(blocks.shard, self.block_len, order[:n]), batch_size=self.batch_size,
                          shuffle=False, num_workers=0, pin_memory=self.pin_memory)

    # ----------------------------------------------------------------------------------------
    # training

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
        self._global_batch = self.batch_size * world
        self._reconcile_resume()
        if self.source.streaming:
            assert isinstance(self.source, HubDataset)
            dataset: IterableDataset = StreamedBatches(
                self.source, DocumentEncoder(self.tokenizer), self.tokenizer.eos_token_id, self.block_len,
                self.batch_size, rank, world, self.progress)
            workers = min(self.num_workers, 1)
        else:
            what = f"one global batch (batch_size {self.batch_size} x world_size {world})"
            blocks = self._require("train", self._global_batch, what=what)
            schedule = BatchSchedule(len(blocks), self.batch_size, world, rank, self.seed)
            dataset = ScheduledBatches(blocks, schedule, self.progress)
            workers = self.num_workers
        # Lightning warns about any IterableDataset with a length (naive multi-worker use duplicates
        # data); ours gives each worker its own batches, so the length is exact.
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined",
                                category=UserWarning)
        return ResumableDataLoader(dataset, self, num_workers=workers, pin_memory=self.pin_memory)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this for the batch it is about to run, after all prefetching.
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self.progress.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_batches": self.progress.consumed, "global_batch_size": self._global_batch,
                "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.progress.consumed = int(state_dict["consumed_batches"])
        self._resumed_global_batch = state_dict.get("global_batch_size")
        if state_dict.get("seed", self.seed) != self.seed:
            warnings.warn(f"resuming with data seed {self.seed} instead of {state_dict['seed']}: the "
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

    def summary(self) -> dict[str, Any]:
        """What `osp data prepare` reports: tokenizer, shard paths, sizes and token counts."""
        info: dict[str, Any] = {"source": self.source.describe(), "tokenizer": self.tokenizer_spec,
                                "vocab_size": self.vocab_size, "seq_len": self.seq_len}
        if self.tokenizer_spec == "bpe":
            info["tokenizer_path"] = str(Path(self.tokenizer.name_or_path))
        for split in ("train", "val"):
            if split == "train" and self.source.streaming:
                info[split] = {"streamed": True}
                continue
            shard = self.shard(split)  # type: ignore[arg-type]
            info[split] = {"path": str(shard.path), "bytes": shard.nbytes, "tokens": shard.num_tokens,
                           "documents": shard.meta["num_documents"],
                           "blocks": shard.num_blocks(self.block_len), "dtype": shard.meta["dtype"]}
        return info
