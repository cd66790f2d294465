"""Exact data-position resume through a real Lightning fit: a run resumed from a mid-epoch checkpoint
trains on exactly the batches an uninterrupted run trains on, despite DataLoader and Lightning prefetching.
And under DDP, each rank trains on its own disjoint share of every global batch."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from osp.data.datamodule import PretrainDataModule
from tests.support.data import make_dm

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*no `validation_step`"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint"),
]


class Recorder(L.LightningModule):
    """Trains nothing; writes down every batch it is given (to a file per rank when `out` is set)."""

    def __init__(self, out: Path | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []
        self.out = out

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.clone())
        return self.weight * batch.float().mean()

    def on_train_end(self) -> None:
        if self.out is not None:
            path = self.out / f"rank{self.global_rank}.json"
            path.write_text(json.dumps([b.tolist() for b in self.seen]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def trainer(tmp_path: Path, max_steps: int, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                   default_root_dir=str(tmp_path), enable_checkpointing=False)
    options.update(kwargs)
    return L.Trainer(**options)


def datamodule(corpus_files: Path, cache: Path, **kw) -> PretrainDataModule:
    return make_dm(corpus_files, cache, **{"batch_size": 96, "seed": 11, "val_blocks": 64, **kw})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_mid_epoch_checkpoint_continues_at_the_exact_batch(tmp_path, corpus_files, num_workers):
    cache, ckpts = tmp_path / "cache", tmp_path / "ckpt"
    dm = datamodule(corpus_files, cache, num_workers=num_workers)
    dm.prepare_data()
    per_epoch = len(dm.train_dataloader())
    assert 3 <= per_epoch <= 6
    stop, total = per_epoch + 2, 2 * per_epoch + 3  # checkpoint mid-epoch 2; finish in epoch 3

    full = Recorder()
    checkpoint = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=stop, save_top_k=-1,
                                 filename="{step}")
    trainer(tmp_path, total, enable_checkpointing=True, callbacks=[checkpoint]).fit(full, datamodule=dm)
    assert len(full.seen) == total

    resumed = Recorder()
    fresh_dm = datamodule(corpus_files, cache, num_workers=num_workers)
    trainer(tmp_path, total).fit(resumed, datamodule=fresh_dm, ckpt_path=str(ckpts / f"step={stop}.ckpt"))
    assert len(resumed.seen) == total - stop
    for expected, got in zip(full.seen[stop:], resumed.seen, strict=True):
        torch.testing.assert_close(got, expected)
    assert fresh_dm.state_dict()["consumed_batches"] == total


@pytest.mark.distributed
def test_ddp_ranks_train_on_disjoint_shares(tmp_path, corpus_files):
    cache = tmp_path / "cache"
    datamodule(corpus_files, cache, batch_size=48).prepare_data()  # built once, before the ranks start
    steps = 4
    trainer(tmp_path, steps, devices=2, strategy="ddp_fork").fit(
        Recorder(out=tmp_path), datamodule=datamodule(corpus_files, cache, batch_size=48))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = Recorder()
    trainer(tmp_path, steps).fit(single, datamodule=datamodule(corpus_files, cache, batch_size=96))
    for step in range(steps):
        r0, r1 = ({tuple(row) for row in ranks[r][step]} for r in (0, 1))
        assert len(r0) == len(r1) == 48 and not r0 & r1
        assert r0 | r1 == {tuple(row) for row in single.seen[step].tolist()}
