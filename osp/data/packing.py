"""Packing: documents joined with EOS into one token stream, cut into contiguous, non-overlapping
blocks of `seq_len + 1` tokens (input = block[:-1], target = block[1:]).

A pre-tokenized split is stored as a token shard: `<name>.bin` (the raw little-endian ids, every
document followed by EOS) and `<name>.json` (dtype, token count, sha256, tokenizer and source
fingerprints). Both are written under temporary names and renamed; the sidecar goes last, so a shard
without one is incomplete and gets rebuilt, and one whose bytes no longer match its sha256 is rebuilt
with a warning. Shards are opened as read-only memmaps: nothing is loaded into
memory, and forked DataLoader workers share the pages.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from osp.atomic import atomic_path, write_json
from osp.data.cache import file_lock, file_sha256
from osp.data.sources import DataError, warn_damaged

SHARD_FORMAT_VERSION = 2  # 2: the sidecar holds the shard's sha256
_WRITE_CHUNK = 1 << 22  # tokens buffered before each write


class TokenShard:
    """A pre-tokenized split: a flat array of token ids on disk plus its metadata."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.num_tokens = int(meta["num_tokens"])
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:  # opened lazily: a pickled shard (DDP spawn, workers) stays small
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}

    def num_blocks(self, block_len: int) -> int:
        return self.num_tokens // block_len

    def block(self, index: int, block_len: int) -> np.ndarray:
        return self.tokens[index * block_len : (index + 1) * block_len]

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.dtype.itemsize


def sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def load_shard(path: Path) -> TokenShard | None:
    """The shard at `path` if it is complete, in the current format and intact, else None.

    Intact: its size and sha256 match the sidecar (hashing runs at about 1.5 GB/s, once per process
    and split). A damaged shard or sidecar is reported with a DataWarning and then rebuilt by the caller.
    """
    path, meta_path = Path(path), sidecar(path)
    if not meta_path.exists() or not path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError):
        warn_damaged(meta_path, "not readable JSON")
        return None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT_VERSION:
        return None  # an older format: rebuilt without a warning
    shard = TokenShard(path, meta)
    if path.stat().st_size != shard.nbytes or file_sha256(path) != meta.get("sha256"):
        warn_damaged(path, "its size or sha256 differs from its sidecar")
        return None
    return shard


def write_shard(path: Path, token_docs: Iterable[np.ndarray], *, dtype: np.dtype, eos_id: int,
                meta: dict[str, Any] | None = None) -> TokenShard:
    """Write documents (arrays of ids), each followed by EOS, as a shard at `path` (atomically)."""
    dtype = np.dtype(dtype).newbyteorder("<")
    if eos_id > np.iinfo(dtype).max:
        raise ValueError(f"EOS id {eos_id} does not fit {dtype}")
    eos = np.array([eos_id], dtype=dtype)
    sidecar(path).unlink(missing_ok=True)  # a rebuild: the old sidecar must never describe the new shard
    num_tokens = num_docs = 0
    digest = hashlib.sha256()
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        pending: list[np.ndarray] = []
        pending_len = 0

        def flush() -> None:
            data = np.concatenate(pending).tobytes()
            f.write(data)
            digest.update(data)

        for doc in token_docs:
            pending += [doc.astype(dtype, copy=False), eos]
            pending_len += len(doc) + 1
            num_docs += 1
            if pending_len >= _WRITE_CHUNK:
                flush()
                num_tokens += pending_len
                pending, pending_len = [], 0
        if pending:
            flush()
            num_tokens += pending_len
    full_meta = {**(meta or {}), "format": SHARD_FORMAT_VERSION, "dtype": dtype.name, "byte_order": "little",
                 "num_tokens": num_tokens, "num_documents": num_docs, "eos_id": eos_id,
                 "sha256": digest.hexdigest()}
    write_json(sidecar(path), full_meta)
    return TokenShard(path, full_meta)


def cached_shard(path: Path, token_docs: Iterable[np.ndarray], *, dtype: np.dtype, eos_id: int,
                 meta: dict[str, Any] | None = None) -> TokenShard:
    """Load the shard at `path`, or build it from `token_docs` (consumed only on a cache miss).

    A lock makes concurrent ranks build it once; the others wait and load it.
    """
    shard = load_shard(path)
    if shard is not None:
        return shard
    with file_lock(Path(path).parent / f".{Path(path).name}.lock"):
        shard = load_shard(path)
        if shard is None:
            shard = write_shard(path, token_docs, dtype=dtype, eos_id=eos_id, meta=meta)
    return shard


def pack_stream(token_docs: Iterable[np.ndarray], block_len: int, eos_id: int) -> Iterator[np.ndarray]:
    """Blocks of `block_len` ids from documents joined with EOS, on the fly (the tail is dropped)."""
    pending = np.empty(0, dtype=np.int64)
    eos = np.array([eos_id], dtype=np.int64)
    for doc in token_docs:
        stream = np.concatenate([pending, doc.astype(np.int64, copy=False), eos])
        full = len(stream) // block_len
        for i in range(full):
            yield stream[i * block_len : (i + 1) * block_len]
        pending = stream[full * block_len :]


def require_blocks(available: int, needed: int, *, split: str, block_len: int, num_tokens: int,
                   what: str = "one block", hint: str = "") -> None:
    """Fail with a clear message when a split is too small for what the run asks of it."""
    hint = f" ({hint})" if hint else ""
    if num_tokens == 0:
        raise DataError(f"the {split} split is empty: no documents (or only empty ones) were found{hint}")
    if available < needed:
        raise DataError(f"the {split} split has {num_tokens:,} tokens = {available} blocks of seq_len+1 = "
                        f"{block_len} tokens, fewer than {what} ({needed} blocks); use more data, a smaller "
                        f"seq_len or a smaller batch_size{hint}")


class PackedBlocks(Dataset):
    """Map-style view of a shard as `len(self)` blocks of `block_len` tokens (LongTensor each)."""

    def __init__(self, shard: TokenShard, block_len: int, indices: np.ndarray | None = None) -> None:
        self.shard = shard
        self.block_len = block_len
        self.indices = indices  # optional subset/order of block numbers

    def __len__(self) -> int:
        return self.shard.num_blocks(self.block_len) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        index = int(i if self.indices is None else self.indices[i])
        return torch.from_numpy(self.shard.block(index, self.block_len).astype(np.int64))

    def take(self, block_indices: np.ndarray) -> torch.Tensor:
        """Blocks by shard block number, stacked: LongTensor (len(block_indices), block_len)."""
        tokens = self.shard.tokens
        rows = [tokens[int(b) * self.block_len : (int(b) + 1) * self.block_len] for b in block_indices]
        if not rows:
            return torch.empty(0, self.block_len, dtype=torch.long)
        return torch.from_numpy(np.stack(rows).astype(np.int64))
