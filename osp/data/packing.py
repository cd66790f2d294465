"""Packing: documents joined with EOS into one token stream, cut into contiguous, non-overlapping
blocks of `seq_len + 1` tokens (input = block[:-1], target = block[1:]).

A pre-tokenized split is stored as a token shard: an index `<name>.json` (dtype, token count, the
tokenizer and source fingerprints, and its pieces) and the pieces `<name>-00000.bin`, `<name>-00001.bin`,
..., each holding at most `piece_tokens` raw little-endian ids (2^28 by default: 512 MiB of uint16), so a
100 GB corpus is a few hundred files of bounded size, not one. The stream is the pieces in order (every
document followed by EOS); a block may span two pieces. Building streams the documents through a buffer
of ~4M tokens, so memory stays flat in corpus size.

Every piece is written under a temporary name and renamed; the index goes last, so a shard without one
is incomplete and gets rebuilt, and one whose piece no longer matches its size or sha256 is rebuilt with a
warning. Pieces are opened as read-only memmaps: nothing is loaded into memory, and forked DataLoader
workers share the pages.
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
from osp.data.sources import warn_damaged
from osp.errors import DataError

SHARD_FORMAT_VERSION = 3  # 2: one .bin per split; 3: an index and pieces of bounded size
PIECE_TOKENS = 1 << 28  # tokens per piece file at most (512 MiB at uint16, 1 GiB at uint32)
_WRITE_CHUNK = 1 << 22  # tokens buffered before each write


class TokenShard:
    """A pre-tokenized split: its pieces on disk, read as one flat array of token ids, plus its metadata."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = Path(path)  # the index
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.num_tokens = int(meta["num_tokens"])
        self.files = [self.path.parent / piece["file"] for piece in meta["pieces"]]
        self._starts = np.cumsum([0] + [int(piece["num_tokens"]) for piece in meta["pieces"]])
        self._maps: list[np.ndarray] | None = None

    def _pieces(self) -> list[np.ndarray]:
        if self._maps is None:  # opened lazily: a pickled shard (DDP spawn, workers) stays small
            self._maps = [np.memmap(f, dtype=self.dtype, mode="r", shape=(int(n),))
                          for f, n in zip(self.files, np.diff(self._starts), strict=True)]
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split: a view into one piece, or a copy joining two or more."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside a shard of {self.num_tokens}")
        pieces = self._pieces()
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        while start < stop:
            offset = start - int(self._starts[first])
            end = min(stop, int(self._starts[first + 1]))
            parts.append(pieces[first][offset : offset + end - start])
            start, first = end, first + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def num_blocks(self, block_len: int) -> int:
        return self.num_tokens // block_len

    def block(self, index: int, block_len: int) -> np.ndarray:
        return self.read(index * block_len, (index + 1) * block_len)

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.dtype.itemsize


def piece_name(index: Path, number: int) -> str:
    return f"{Path(index).stem}-{number:05d}.bin"


def load_shard(path: Path) -> TokenShard | None:
    """The shard whose index is `path` if it is complete, in the current format and intact, else None.

    Intact: every piece's size and sha256 match the index (hashing runs at about 1.5 GB/s, once per process
    and split). A damaged piece or index is reported with a DataWarning and then rebuilt by the caller.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError):
        warn_damaged(path, "not readable JSON")
        return None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT_VERSION:
        return None  # an older format: rebuilt without a warning
    shard = TokenShard(path, meta)
    for file, piece in zip(shard.files, meta["pieces"], strict=True):
        size = int(piece["num_tokens"]) * shard.dtype.itemsize
        if not file.exists() or file.stat().st_size != size or file_sha256(file) != piece["sha256"]:
            warn_damaged(file, f"missing, or its size or sha256 differs from {path.name}")
            return None
    return shard


def _chunks(token_docs: Iterable[np.ndarray], dtype: np.dtype, eos_id: int,
            count: list[int]) -> Iterator[np.ndarray]:
    """The stream (every document followed by EOS) in arrays of about _WRITE_CHUNK tokens; counts
    documents."""
    eos = np.array([eos_id], dtype=dtype)
    pending: list[np.ndarray] = []
    pending_len = 0
    for doc in token_docs:
        pending += [doc.astype(dtype, copy=False), eos]
        pending_len += len(doc) + 1
        count[0] += 1
        if pending_len >= _WRITE_CHUNK:
            yield np.concatenate(pending)
            pending, pending_len = [], 0
    if pending:
        yield np.concatenate(pending)


def write_shard(path: Path, token_docs: Iterable[np.ndarray], *, dtype: np.dtype, eos_id: int,
                meta: dict[str, Any] | None = None, piece_tokens: int = PIECE_TOKENS) -> TokenShard:
    """Write documents (arrays of ids), each followed by EOS, as the shard whose index is `path`."""
    path = Path(path)
    dtype = np.dtype(dtype).newbyteorder("<")
    if eos_id > np.iinfo(dtype).max:
        raise ValueError(f"EOS id {eos_id} does not fit {dtype}")
    if piece_tokens < 1:
        raise ValueError(f"piece_tokens must be positive, got {piece_tokens}")
    path.unlink(missing_ok=True)  # a rebuild: the old index must never describe the new pieces
    path.with_suffix(".bin").unlink(missing_ok=True)  # the single file of a format-2 shard
    documents = [0]
    chunks = _chunks(token_docs, dtype, eos_id, documents)
    pieces: list[dict[str, Any]] = []
    carry = next(chunks, None)
    while carry is not None:
        name = piece_name(path, len(pieces))
        digest, filled = hashlib.sha256(), 0
        with atomic_path(path.parent / name) as tmp, open(tmp, "wb") as f:
            while carry is not None and filled < piece_tokens:
                take = carry[: piece_tokens - filled]
                data = take.tobytes()
                f.write(data)
                digest.update(data)
                filled += len(take)
                carry = carry[len(take) :] if len(take) < len(carry) else next(chunks, None)
        pieces.append({"file": name, "num_tokens": filled, "sha256": digest.hexdigest()})
    kept = {piece["file"] for piece in pieces}
    for stale in path.parent.glob(f"{path.stem}-*.bin"):  # pieces of an earlier, longer build
        if stale.name not in kept:
            stale.unlink(missing_ok=True)
    full_meta = {**(meta or {}), "format": SHARD_FORMAT_VERSION, "dtype": dtype.name, "byte_order": "little",
                 "num_tokens": sum(piece["num_tokens"] for piece in pieces), "num_documents": documents[0],
                 "eos_id": eos_id, "piece_tokens": piece_tokens, "pieces": pieces}
    write_json(path, full_meta)
    return TokenShard(path, full_meta)


def cached_shard(path: Path, token_docs: Iterable[np.ndarray], *, dtype: np.dtype, eos_id: int,
                 meta: dict[str, Any] | None = None, piece_tokens: int = PIECE_TOKENS) -> TokenShard:
    """Load the shard at `path`, or build it from `token_docs` (consumed only on a cache miss).

    A lock makes concurrent ranks build it once; the others wait and load it.
    """
    shard = load_shard(path)
    if shard is not None:
        return shard
    with file_lock(Path(path).parent / f".{Path(path).name}.lock"):
        shard = load_shard(path)
        if shard is None:
            shard = write_shard(path, token_docs, dtype=dtype, eos_id=eos_id, meta=meta,
                                piece_tokens=piece_tokens)
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
        rows = [self.shard.block(int(b), self.block_len) for b in block_indices]
        if not rows:
            return torch.empty(0, self.block_len, dtype=torch.long)
        return torch.from_numpy(np.stack(rows).astype(np.int64))
