"""`TokenPipeline`: source -> tokenizer -> token shards -> held-out blocks and per-rank training batches.

No Lightning here: `osp eval`, the benchmarks and `osp data prepare` use the pipeline as it is, and
`osp.data.datamodule.PretrainDataModule` is a thin LightningDataModule over it.

Blocks are LongTensor rows of seq_len + 1 tokens; the model reads input = [:, :-1], target = [:, 1:].

Training order (pre-tokenized sources: demo, files). Global batch b (counted across epochs) is a
pure function of (seed, b): epoch e = b // batches_per_epoch takes a permutation of all blocks
seeded by (seed, e); its b-th slice of batch_size × world_size blocks is split rank-strided, so
rank r gets slice[r::world_size]. Ranks never share a block and every epoch uses every block at
most once (the remainder of an epoch that does not fill a global batch is skipped).

Streaming (hub) sources are read in stored order: documents -> tokens -> blocks on the fly, each
rank reading its own share of the documents; on resume the stream is replayed and the consumed
batches are skipped. The train stream is then endless (use `max_steps`).

The position in the training order is one number, `TrainProgress.consumed`: the training batches the
loop has consumed. The datasets read it when an iteration starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from osp.data.cache import cache_root, fingerprint
from osp.data.packing import PackedBlocks, TokenShard, cached_shard, pack_stream, require_blocks
from osp.data.sources import Split
from osp.data.tokenizer import (
    DocumentEncoder,
    build_tokenizer,
    token_dtype,
    tokenizer_fingerprint,
    vocab_size_of,
)
from osp.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from osp.data.config import DataConfig
    from osp.data.hub import HubDataset

# Held-out blocks are drawn with a fixed seed, not the run's seed, so that runs with different
# seeds are evaluated on the same text.
HELDOUT_SEED = 0


class TrainProgress:
    """The number of training batches consumed so far (shared by the pipeline's datasets and their owner)."""

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


class TokenPipeline:
    """The data of one config: tokenizer, token shards and blocks, each built once and cached on disk.

    Safe to use from any rank: concurrent builders of a cache entry wait for one another (file locks).
    """

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.source = config.source
        self._tokenizer: PreTrainedTokenizerFast | None = None
        self._tokenizer_fp = ""
        self._vocab_size = 0
        self._source_fp = ""
        self._shards: dict[str, TokenShard] = {}

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def block_len(self) -> int:
        return self.config.seq_len + 1

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The tokenizer (built or loaded from the cache on first access)."""
        if self._tokenizer is None:
            cfg = self.config
            tokenizer = build_tokenizer(cfg.tokenizer, self.source, cfg.vocab_size,
                                        max_train_chars=cfg.tokenizer_train_chars, cache_dir=cfg.cache_dir)
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
        if not self._source_fp:  # once per pipeline: for local files it stats every file
            self._source_fp = self.source.fingerprint()
        return self._source_fp

    def tokenizer_fingerprint(self) -> str:
        """A digest of the tokenizer (vocabulary, merges, special tokens); builds it on first use."""
        self.tokenizer  # noqa: B018 - built on first access
        return self._tokenizer_fp

    def shard_path(self, split: Split) -> Path:
        """The index of the token shard of `split` (its pieces lie beside it): keyed by source content,
        tokenizer and split."""
        self.tokenizer  # noqa: B018 - sets the tokenizer fingerprint
        key = fingerprint("shard", self.source_fingerprint(), self._tokenizer_fp, split)[:16]
        return cache_root(self.config.cache_dir) / "shards" / f"{self.source.kind}-{split}-{key}.json"

    def shard(self, split: Split) -> TokenShard:
        """The pre-tokenized split (built on first use, then loaded from the cache)."""
        if split == "train" and self.source.streaming:
            raise DataError(f"{self.source.describe()} is streamed: its training split has no shard")
        if split not in self._shards:
            tokenizer = self.tokenizer
            meta = {"source": self.source.describe(), "source_fingerprint": self.source_fingerprint(),
                    "tokenizer": self.config.tokenizer, "tokenizer_fingerprint": self._tokenizer_fp,
                    "vocab_size": self.vocab_size, "split": split}
            docs = DocumentEncoder(tokenizer).encode(self.source.documents(split))  # consumed on a miss only
            self._shards[split] = cached_shard(self.shard_path(split), docs,
                                               dtype=token_dtype(self.vocab_size),
                                               eos_id=tokenizer.eos_token_id, meta=meta)
        return self._shards[split]

    def blocks(self, split: Split, needed: int = 1, what: str = "one block") -> PackedBlocks:
        """The split as blocks of seq_len + 1 tokens; fails with what to do when it has fewer than
        `needed`."""
        shard = self.shard(split)
        blocks = PackedBlocks(shard, self.block_len)
        require_blocks(len(blocks), needed, split=split, block_len=self.block_len,
                       num_tokens=shard.num_tokens, what=what,
                       hint=self.source.val_hint() if split == "val" else "")
        return blocks

    def prepare(self) -> None:
        """Fetch the corpus and build tokenizer and shards."""
        self.source.prepare()
        self.blocks("val")
        if not self.source.streaming:
            self.blocks("train")

    # ----------------------------------------------------------------------------------------
    # validation and calibration

    def heldout_order(self) -> np.ndarray:
        """The validation blocks' fixed order (seeded by HELDOUT_SEED): the first n are
        `heldout_blocks(n)`."""
        return np.random.default_rng(HELDOUT_SEED).permutation(len(self.blocks("val")))

    def heldout_blocks(self, n: int) -> torch.Tensor:
        """`n` validation blocks, LongTensor (n, seq_len + 1): the same on every call, rank and run seed."""
        blocks = self.blocks("val", n, what=f"the {n} held-out blocks asked for")
        return blocks.take(self.heldout_order()[:n])

    def val_dataset(self) -> PackedBlocks:
        """The first `val_blocks` held-out blocks (all with val_blocks None), as a map-style dataset."""
        order = self.heldout_order()
        n = len(order) if self.config.val_blocks is None else min(self.config.val_blocks, len(order))
        return PackedBlocks(self.shard("val"), self.block_len, order[:n])

    def train_blocks(self, n: int) -> torch.Tensor:
        """`n` training blocks, LongTensor (n, seq_len + 1), evenly spaced over the training split:
        calibration data from the training distribution (GPTQ), never the held-out text."""
        if self.source.streaming:
            raise DataError("train_blocks needs a pre-tokenized source (demo or files), not a streaming one")
        blocks = self.blocks("train", n, what=f"the {n} calibration blocks asked for")
        return blocks.take(np.linspace(0, len(blocks) - 1, n).round().astype(np.int64))

    # ----------------------------------------------------------------------------------------
    # training

    def train_dataset(self, rank: int, world_size: int, progress: TrainProgress) -> IterableDataset:
        """This rank's micro-batches (LongTensor (batch_size, seq_len + 1) each), from `progress.consumed`
        on."""
        cfg = self.config
        if self.source.streaming:
            return StreamedBatches(self.source, DocumentEncoder(self.tokenizer),  # type: ignore[arg-type]
                                   self.tokenizer.eos_token_id, self.block_len, cfg.batch_size, rank,
                                   world_size, progress)
        what = f"one global batch (batch_size {cfg.batch_size} x world_size {world_size})"
        blocks = self.blocks("train", cfg.batch_size * world_size, what=what)
        schedule = BatchSchedule(len(blocks), cfg.batch_size, world_size, rank, cfg.seed)
        return ScheduledBatches(blocks, schedule, progress)

    def train_workers(self) -> int:
        """DataLoader workers for training: a stream is one ordered reader, so at most one there."""
        return min(self.config.num_workers, 1) if self.source.streaming else self.config.num_workers

    def summary(self) -> dict[str, Any]:
        """What `osp data prepare` reports: tokenizer, shard paths, sizes and token counts."""
        info: dict[str, Any] = {"source": self.source.describe(), "tokenizer": self.config.tokenizer,
                                "vocab_size": self.vocab_size, "seq_len": self.seq_len}
        if self.config.tokenizer == "bpe":
            info["tokenizer_path"] = str(Path(self.tokenizer.name_or_path))
        for split in ("train", "val"):
            if split == "train" and self.source.streaming:
                info[split] = {"streamed": True}
                continue
            shard = self.shard(split)  # type: ignore[arg-type]
            info[split] = {"path": str(shard.path), "files": len(shard.files), "bytes": shard.nbytes,
                           "tokens": shard.num_tokens,
                           "documents": shard.meta["num_documents"],
                           "blocks": shard.num_blocks(self.block_len), "dtype": shard.meta["dtype"]}
        return info
