"""The data pipeline and its LightningDataModule without a trainer: schedule, rank split, held-out blocks,
resume state, errors, streaming. (DataConfig and the presets: test_data_config.py.)"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from osp.data.datamodule import PretrainDataModule
from osp.data.pipeline import BatchSchedule
from osp.errors import ConfigError, DataError
from tests.support.data import hub_source, make_dm


def batches(dm: PretrainDataModule, n: int | None = None) -> list[torch.Tensor]:
    out = []
    for batch in dm.train_dataloader():
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def consume(dm: PretrainDataModule, n: int) -> None:
    """What Lightning does for each batch it trains on."""
    dm.trainer = SimpleNamespace(training=True)
    for _ in range(n):
        dm.on_after_batch_transfer(None, 0)
    dm.trainer = None


def rows(t: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in t.tolist()}


def markers(dm: PretrainDataModule, blocks: torch.Tensor) -> set[str]:
    return set(re.findall(r"doc\d{4}", dm.tokenizer.decode(blocks.flatten().tolist())))


def test_schedule_permutes_every_block_once_per_epoch():
    schedule = BatchSchedule(num_blocks=23, batch_size=2, world_size=2, rank=0, seed=3)
    assert schedule.batches_per_epoch == 5  # 23 // 4; the last 3 blocks wait for another epoch's order
    for epoch in range(3):
        seen = np.concatenate([np.concatenate([BatchSchedule(23, 2, 2, r, 3).blocks(b) for r in (0, 1)])
                               for b in range(epoch * 5, (epoch + 1) * 5)])
        assert len(seen) == len(set(seen.tolist())) == 20
    assert schedule.blocks(0).tolist() != schedule.blocks(5).tolist()  # a new order each epoch
    assert BatchSchedule(23, 2, 2, 0, seed=4).blocks(0).tolist() != schedule.blocks(0).tolist()


def test_train_batches_are_shard_blocks_in_schedule_order(tmp_path, corpus_files):
    dm = make_dm(corpus_files, tmp_path)
    epoch = batches(dm)
    loader = dm.train_dataloader()
    assert len(epoch) == len(loader) > 5
    shard, schedule = loader.dataset.blocks, loader.dataset.schedule
    for b, batch in enumerate(epoch):
        assert batch.shape == (4, 16) and batch.dtype == torch.long
        torch.testing.assert_close(batch, shard.take(schedule.blocks(b)))
    assert int(torch.stack(epoch).max()) < dm.pipeline.vocab_size <= 300
    assert dm.pipeline.vocab_size == len(dm.tokenizer)
    # Same seed, same order, from a second module loading everything from the cache.
    again = batches(make_dm(corpus_files, tmp_path), 3)
    for a, b in zip(epoch[:3], again, strict=True):
        torch.testing.assert_close(a, b)


def test_train_and_validation_never_share_a_document(tmp_path, corpus_files):
    dm = make_dm(corpus_files, tmp_path)
    train_docs = markers(dm, torch.cat(batches(dm)))
    val_docs = markers(dm, dm.heldout_blocks(len(dm.pipeline.heldout_order())))
    assert train_docs and val_docs and not train_docs & val_docs


def test_heldout_blocks_are_deterministic_and_seed_independent(tmp_path, corpus_files):
    a = make_dm(corpus_files, tmp_path, seed=1).heldout_blocks(5)
    b = make_dm(corpus_files, tmp_path, seed=2).heldout_blocks(5)
    assert a.shape == (5, 16) and a.dtype == torch.long
    torch.testing.assert_close(a, b)
    dm = make_dm(corpus_files, tmp_path)
    torch.testing.assert_close(dm.heldout_blocks(3), a[:3])
    val = torch.cat(list(dm.val_dataloader()))
    torch.testing.assert_close(val, dm.heldout_blocks(8))
    with pytest.raises(DataError, match="fewer than the 100000 held-out blocks asked for"):
        dm.heldout_blocks(100_000)


def test_ranks_get_disjoint_shares_of_each_global_batch(tmp_path, corpus_files):
    single = batches(make_dm(corpus_files, tmp_path, batch_size=8))
    per_rank = [batches(make_dm(corpus_files, tmp_path, batch_size=4, world_size=2, rank=r)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(single)
    for global_batch, r0, r1 in zip(single, *per_rank, strict=True):
        assert r0.shape == r1.shape == (4, 16)
        assert not rows(r0) & rows(r1)
        assert rows(r0) | rows(r1) == rows(global_batch)
    with pytest.raises(ValueError, match="world_size and rank go together"):
        make_dm(corpus_files, tmp_path, world_size=2)


@pytest.mark.parametrize("consumed", [0, 3, 13])
def test_state_dict_resumes_at_the_next_batch(tmp_path, corpus_files, consumed):
    reference = batches(make_dm(corpus_files, tmp_path, batch_size=64))  # a few batches per epoch
    per_epoch = len(reference)
    assert 3 < per_epoch < 13  # so that consumed=13 resumes in the middle of the second epoch
    uninterrupted = reference + batches_from(make_dm(corpus_files, tmp_path, batch_size=64), per_epoch, 20)

    dm = make_dm(corpus_files, tmp_path, batch_size=64)
    iterator = iter(dm.train_dataloader())
    for _ in range(min(consumed + 2, per_epoch)):  # fetched ahead of what the loop consumed
        next(iterator)
    consume(dm, consumed)
    state = dm.state_dict()
    assert state["consumed_batches"] == consumed

    resumed = make_dm(corpus_files, tmp_path, batch_size=64)
    resumed.load_state_dict(state)
    torch.testing.assert_close(next(iter(resumed.train_dataloader())), uninterrupted[consumed])


def batches_from(dm: PretrainDataModule, start: int, stop: int) -> list[torch.Tensor]:
    """Batches start..stop-1 of the schedule, crossing epochs like Lightning does (one iterator per epoch)."""
    dm.load_state_dict({"consumed_batches": start})
    out: list[torch.Tensor] = []
    while len(out) < stop - start:
        for batch in dm.train_dataloader():
            out.append(batch)
            consume(dm, 1)
            if len(out) == stop - start:
                break
    return out


def test_resume_with_another_world_size_warns(tmp_path, corpus_files):
    dm = make_dm(corpus_files, tmp_path, world_size=2, rank=1)
    dm.load_state_dict({"consumed_batches": 6, "global_batch_size": 4, "seed": 7})
    with pytest.warns(UserWarning, match="global batch of 8 blocks instead of 4"):
        dm.train_dataloader()
    assert dm.progress.consumed == 3


def test_errors_for_missing_empty_and_too_small_data(tmp_path, corpus_files):
    with pytest.raises(DataError, match="no .txt/.jsonl/.json/.parquet files match"):
        make_dm(tmp_path / "nowhere", tmp_path).prepare_data()
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="the train split is empty"):
        make_dm(tmp_path, tmp_path / "c1", {"paths": str(tmp_path / "empty.txt")}).train_dataloader()
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_dm(corpus_files, tmp_path, batch_size=100_000).train_dataloader()
    with pytest.raises(DataError, match=r"the val split is empty.*data.source.val_fraction is 0.0: raise it"):
        make_dm(corpus_files, tmp_path, {"val_fraction": 0.0}).heldout_blocks(1)
    with pytest.raises(ConfigError, match="data.seq_len=0 must be an integer >= 1"):
        make_dm(corpus_files, tmp_path, seq_len=0)


def test_pretrained_tokenizer_folder(tmp_path, corpus_files):
    bpe_dm = make_dm(corpus_files, tmp_path)
    bpe_dm.tokenizer.save_pretrained(tmp_path / "tok")
    dm = make_dm(corpus_files, tmp_path, tokenizer=str(tmp_path / "tok"), vocab_size=123)
    # the tokenizer's own size; vocab_size only sizes a BPE
    assert dm.pipeline.vocab_size == bpe_dm.pipeline.vocab_size
    torch.testing.assert_close(dm.heldout_blocks(2), bpe_dm.heldout_blocks(2))


def test_streamed_source_packs_resumes_and_splits_by_rank(tmp_path, corpus_files):
    def hub(**kw) -> PretrainDataModule:
        return make_dm(corpus_files, tmp_path, hub_source(corpus_files), **kw)

    dm = hub()
    iterator = iter(dm.train_dataloader())
    stream = [next(iterator) for _ in range(40)]  # more than one pass over the data: loops over epochs
    assert all(b.shape == (4, 16) for b in stream)
    assert not markers(dm, torch.cat(stream)) & markers(dm, dm.heldout_blocks(4))

    resumed = hub()
    resumed.load_state_dict({"consumed_batches": 17})
    torch.testing.assert_close(next(iter(resumed.train_dataloader())), stream[17])

    shares = [markers(dm, next(iter(hub(world_size=2, rank=r).train_dataloader()))) for r in (0, 1)]
    assert shares[0] and shares[1] and not shares[0] & shares[1]


def test_train_blocks_come_from_the_training_split(tmp_path, corpus_files):
    from osp.data.packing import PackedBlocks

    dm = make_dm(corpus_files, tmp_path)
    calib = dm.pipeline.train_blocks(4)
    assert calib.shape == (4, 16)
    torch.testing.assert_close(calib, dm.pipeline.train_blocks(4))
    train_blocks = PackedBlocks(dm.pipeline.shard("train"), 16)
    train = {tuple(train_blocks.take(np.array([i]))[0].tolist()) for i in range(len(train_blocks))}
    assert {tuple(b.tolist()) for b in calib} <= train
    assert not {tuple(b.tolist()) for b in dm.heldout_blocks(8)} & {tuple(b.tolist()) for b in calib}
