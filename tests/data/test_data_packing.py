"""Token shards (memmap + JSON sidecar) and packing into contiguous blocks of seq_len + 1."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from osp.data.packing import (PackedBlocks, cached_shard, load_shard, pack_stream, require_blocks, sidecar,
                              write_shard)
from osp.data.sources import DataError, DataWarning

EOS = 0


def _docs(sizes: list[int], start: int = 1) -> list[np.ndarray]:
    out, next_id = [], start
    for n in sizes:
        out.append(np.arange(next_id, next_id + n, dtype=np.int64))
        next_id += n
    return out


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_shard_round_trip(tmp_path, dtype):
    docs = _docs([5, 1, 0, 7], start=60_000 if dtype == np.uint16 else 100_000)
    shard = write_shard(tmp_path / "s.bin", docs, dtype=np.dtype(dtype), eos_id=EOS, meta={"split": "train"})
    expected = np.concatenate([np.append(d, EOS) for d in docs])
    assert shard.num_tokens == len(expected) == 17
    loaded = load_shard(tmp_path / "s.bin")
    assert loaded is not None
    assert loaded.tokens.dtype == np.dtype(dtype) and isinstance(loaded.tokens, np.memmap)
    np.testing.assert_array_equal(loaded.tokens, expected)
    meta = json.loads(sidecar(tmp_path / "s.bin").read_text())
    assert meta["dtype"] == np.dtype(dtype).name and meta["num_tokens"] == 17 and meta["num_documents"] == 4
    assert meta["split"] == "train" and meta["eos_id"] == EOS
    assert (tmp_path / "s.bin").stat().st_size == 17 * np.dtype(dtype).itemsize
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.json"]  # no temporaries left


def test_pickled_shard_does_not_carry_its_tokens(tmp_path):
    shard = write_shard(tmp_path / "s.bin", _docs([10_000]), dtype=np.dtype(np.uint16), eos_id=EOS)
    shard.tokens  # noqa: B018 - open the memmap
    restored = pickle.loads(pickle.dumps(shard))
    assert len(pickle.dumps(shard)) < 2_000
    np.testing.assert_array_equal(restored.tokens, shard.tokens)


def test_incomplete_shards_are_not_loaded(tmp_path):
    write_shard(tmp_path / "s.bin", _docs([8]), dtype=np.dtype(np.uint16), eos_id=EOS)
    with open(tmp_path / "s.bin", "r+b") as f:
        f.truncate(6)
    with pytest.warns(DataWarning, match="damaged cache entry"):
        assert load_shard(tmp_path / "s.bin") is None
    sidecar(tmp_path / "s.bin").unlink()
    assert load_shard(tmp_path / "s.bin") is None


def test_cached_shard_builds_once(tmp_path):
    consumed = []

    def docs():
        consumed.append(True)
        yield from _docs([4, 4])

    first = cached_shard(tmp_path / "s.bin", docs(), dtype=np.dtype(np.uint16), eos_id=EOS)
    second = cached_shard(tmp_path / "s.bin", docs(), dtype=np.dtype(np.uint16), eos_id=EOS)
    assert consumed == [True]  # the second generator was never started
    np.testing.assert_array_equal(first.tokens, second.tokens)


def test_blocks_are_contiguous_and_do_not_overlap(tmp_path):
    docs = _docs([13, 2, 30, 9])
    shard = write_shard(tmp_path / "s.bin", docs, dtype=np.dtype(np.uint16), eos_id=EOS)
    block_len = 9
    blocks = PackedBlocks(shard, block_len)
    assert len(blocks) == shard.num_tokens // block_len == 6
    stacked = torch.stack([blocks[i] for i in range(len(blocks))])
    assert stacked.dtype == torch.long and stacked.shape == (6, block_len)
    # Concatenated blocks are exactly the start of the EOS-joined stream: no gaps, no overlaps.
    stream = np.concatenate([np.append(d, EOS) for d in docs])
    np.testing.assert_array_equal(stacked.flatten().numpy(), stream[: 6 * block_len])
    torch.testing.assert_close(blocks.take(np.array([4, 1])), stacked[[4, 1]])
    # The on-the-fly packer used for streamed sources cuts the same blocks.
    streamed = np.stack(list(pack_stream(docs, block_len, EOS)))
    np.testing.assert_array_equal(streamed, stacked.numpy())


def test_too_little_data_is_a_clear_error():
    with pytest.raises(DataError, match="the val split is empty"):
        require_blocks(0, 1, split="val", block_len=9, num_tokens=0)
    with pytest.raises(DataError, match=r"40 tokens = 4 blocks .* fewer than one global batch \(8 blocks\)"):
        require_blocks(4, 8, split="train", block_len=9, num_tokens=40, what="one global batch")
    require_blocks(8, 8, split="train", block_len=9, num_tokens=80)
