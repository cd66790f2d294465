"""Data pipeline: text sources -> tokenizer -> packed token blocks -> a stateful, per-rank DataModule.

`PretrainDataModule` is imported lazily: it pulls in Lightning (seconds), which the extractors,
sources and tokenizer utilities do not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from osp.data.sources import DataError, DemoCorpus, HubDataset, LocalFiles, TextSource, build_source

if TYPE_CHECKING:
    from osp.data.datamodule import PretrainDataModule

__all__ = [
    "DataError", "DemoCorpus", "HubDataset", "LocalFiles", "PretrainDataModule", "TextSource", "build_source",
]


def __getattr__(name: str) -> Any:
    if name == "PretrainDataModule":
        from osp.data.datamodule import PretrainDataModule

        return PretrainDataModule
    raise AttributeError(f"module 'osp.data' has no attribute {name!r}")
