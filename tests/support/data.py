"""Small data pipelines and modules over the `corpus_files` fixture (tests/data/conftest.py): a files source
with a 15% hash split, a 300-token BPE and blocks of 16 tokens, cached under the test's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from osp.data import DataConfig, TokenPipeline


def data_config(corpus_files: Path, cache: Path, source: dict[str, Any] | None = None,
                **shared: Any) -> DataConfig:
    """`source` with a `kind` replaces the files source; without one it changes the files source's
    settings."""
    if source is None or "kind" not in source:
        source = {"kind": "files", "paths": str(corpus_files / "*"), "val_fraction": 0.15, **(source or {})}
    node = {"source": source, "vocab_size": 300, "seq_len": 15, "batch_size": 4, "seed": 7, "val_blocks": 8,
            "cache_dir": str(cache), **shared}
    return DataConfig.from_dict(node)


def make_dm(corpus_files: Path, cache: Path, source: dict[str, Any] | None = None, *,
            world_size: int | None = None, rank: int | None = None,
            **shared: Any):  # noqa: ANN201 - a PretrainDataModule (imports Lightning)
    from osp.data.datamodule import PretrainDataModule

    return PretrainDataModule(TokenPipeline(data_config(corpus_files, cache, source, **shared)),
                              world_size=world_size, rank=rank)


def hub_source(corpus_files: Path, **settings: Any) -> dict[str, Any]:
    """The hub source over the local web.jsonl (datasets' json builder: the streaming code, offline)."""
    return {"kind": "hub", "name": "json", "data_files": str(corpus_files / "web.jsonl"), "val_docs": 8,
            **settings}
