"""Data pipeline: a text source -> tokenizer -> token shards -> held-out blocks and per-rank, resumable
batches.

    from osp.data import DataConfig, TokenPipeline
    pipeline = TokenPipeline(DataConfig.from_dict({"source": {"kind": "files", "paths": "corpus/*.txt"}}))
    pipeline.heldout_blocks(16)          # no Lightning needed
    dm = PretrainDataModule(pipeline)    # osp.data.datamodule: the LightningDataModule `osp train` uses

Modules: sources (the TextSource interface, DataError), demo/ (the demo corpus and its extractors), files,
hub (one module per source), config (DataConfig, the SOURCES registry), tokenizer, packing (token shards),
pipeline (TokenPipeline, the batch order), datamodule (the thin LightningDataModule; imports Lightning,
so it is not imported here).
"""

from __future__ import annotations

from osp.data.config import SOURCES, DataConfig, build_source
from osp.data.demo import DemoCorpus
from osp.data.files import LocalFiles
from osp.data.hub import HubDataset
from osp.data.pipeline import TokenPipeline
from osp.data.sources import TextSource
from osp.errors import DataError

__all__ = ["SOURCES", "DataConfig", "DataError", "DemoCorpus", "HubDataset", "LocalFiles", "TextSource",
           "TokenPipeline", "build_source"]
