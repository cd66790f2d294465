"""Token shards (an index + memmapped pieces of bounded size) and packing into contiguous blocks of
seq_len + 1."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from osp.data.packing import PackedBlocks, cached_shard, load_shard, pack_stream, require_blocks, write_shard
from osp.data.sources import DataWarning
from osp.errors import DataError

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
    shard = write_shard(tmp_path / "s.json", docs, dtype=np.dtype(dtype), eos_id=EOS, meta={"split": "train"})
    expected = np.concatenate([np.append(d, EOS) for d in docs])
    assert shard.num_tokens == len(expected) == 17
    loaded = load_shard(tmp_path / "s.json")
    assert loaded is not None
    tokens = loaded.read(0, 17)
    assert tokens.dtype == np.dtype(dtype) and isinstance(tokens, np.memmap)  # one piece: a view, not a copy
    np.testing.assert_array_equal(tokens, expected)
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["dtype"] == np.dtype(dtype).name and meta["num_tokens"] == 17 and meta["num_documents"] == 4
    assert meta["split"] == "train" and meta["eos_id"] == EOS
    assert (tmp_path / "s-00000.bin").stat().st_size == 17 * np.dtype(dtype).itemsize
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-00000.bin", "s.json"]  # no temporaries left


def test_pieces_are_bounded_and_read_as_one_stream(tmp_path):
    docs = _docs([13, 2, 30, 9, 0, 21])
    stream = np.concatenate([np.append(d, EOS) for d in docs])  # 81 tokens
    shard = write_shard(tmp_path / "s.json", docs, dtype=np.dtype(np.uint16), eos_id=EOS, piece_tokens=16)
    sizes = [f.stat().st_size // 2 for f in shard.files]
    assert sizes == [16, 16, 16, 16, 16, 1] and shard.num_tokens == len(stream) == 81
    loaded = load_shard(tmp_path / "s.json")
    for start, stop in [(0, 81), (0, 16), (15, 17), (5, 70), (32, 48), (80, 81), (40, 40)]:
        np.testing.assert_array_equal(loaded.read(start, stop), stream[start:stop])
    with pytest.raises(IndexError):
        loaded.read(70, 82)
    # Blocks straddling piece boundaries are the same blocks as from one piece.
    whole = write_shard(tmp_path / "w.json", docs, dtype=np.dtype(np.uint16), eos_id=EOS)
    assert len(whole.files) == 1
    for block_len in (7, 16, 17):
        torch.testing.assert_close(PackedBlocks(loaded, block_len).take(np.arange(81 // block_len)),
                                   PackedBlocks(whole, block_len).take(np.arange(81 // block_len)))
    # A rebuild with fewer pieces leaves none of the old ones behind.
    write_shard(tmp_path / "s.json", docs[:1], dtype=np.dtype(np.uint16), eos_id=EOS, piece_tokens=16)
    assert sorted(p.name for p in tmp_path.glob("s-*.bin")) == ["s-00000.bin"]


def test_memory_while_building_is_flat_in_corpus_size(tmp_path):
    """The builder holds one write buffer (~4M tokens), never the corpus: 32M tokens in, < 64 MB extra
    peak."""
    import tracemalloc

    def docs():
        for i in range(64):
            yield np.full(500_000, i, dtype=np.int64)

    tracemalloc.start()
    shard = write_shard(tmp_path / "big.json", docs(), dtype=np.dtype(np.uint16), eos_id=EOS,
                        piece_tokens=5_000_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert shard.num_tokens == 64 * 500_001 and len(shard.files) == 7
    assert peak < 64 * 2**20, peak  # the corpus as int64 would be 256 MB
    assert int(shard.read(500_000, 500_002)[0]) == EOS and int(shard.read(31_999_999, 32_000_000)[0]) == 63


def test_pickled_shard_does_not_carry_its_tokens(tmp_path):
    shard = write_shard(tmp_path / "s.json", _docs([10_000]), dtype=np.dtype(np.uint16), eos_id=EOS)
    shard.read(0, 10)  # opens the memmaps
    restored = pickle.loads(pickle.dumps(shard))
    assert len(pickle.dumps(shard)) < 2_000
    np.testing.assert_array_equal(restored.read(0, 10_001), shard.read(0, 10_001))


def test_incomplete_shards_are_not_loaded(tmp_path):
    write_shard(tmp_path / "s.json", _docs([8]), dtype=np.dtype(np.uint16), eos_id=EOS)
    with open(tmp_path / "s-00000.bin", "r+b") as f:
        f.truncate(6)
    with pytest.warns(DataWarning, match="damaged cache entry"):
        assert load_shard(tmp_path / "s.json") is None
    (tmp_path / "s.json").unlink()
    assert load_shard(tmp_path / "s.json") is None
    # A shard of the previous format (one .bin beside its sidecar) is rebuilt quietly, its file removed.
    (tmp_path / "old.bin").write_bytes(b"\0" * 18)
    (tmp_path / "old.json").write_text(json.dumps({"format": 2, "dtype": "uint16", "num_tokens": 9}))
    assert load_shard(tmp_path / "old.json") is None
    write_shard(tmp_path / "old.json", _docs([8]), dtype=np.dtype(np.uint16), eos_id=EOS)
    assert not (tmp_path / "old.bin").exists() and load_shard(tmp_path / "old.json") is not None


def test_cached_shard_builds_once(tmp_path):
    consumed = []

    def docs():
        consumed.append(True)
        yield from _docs([4, 4])

    first = cached_shard(tmp_path / "s.json", docs(), dtype=np.dtype(np.uint16), eos_id=EOS)
    second = cached_shard(tmp_path / "s.json", docs(), dtype=np.dtype(np.uint16), eos_id=EOS)
    assert consumed == [True]  # the second generator was never started
    np.testing.assert_array_equal(first.read(0, 10), second.read(0, 10))


def test_blocks_are_contiguous_and_do_not_overlap(tmp_path):
    docs = _docs([13, 2, 30, 9])
    shard = write_shard(tmp_path / "s.json", docs, dtype=np.dtype(np.uint16), eos_id=EOS)
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
