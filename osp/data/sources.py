"""What every text source is: documents per split, a fingerprint of their identity, and the data errors.

The sources themselves live one module each: `osp.data.demo` (Jane Austen + a public-domain bible from
Debian packages), `osp.data.files` (local .txt/.jsonl/.parquet) and `osp.data.hub` (a streamed Hugging Face
dataset). `osp.data.config.SOURCES` maps the `data.source.kind` of a config to its class; the other keys of
`data.source` are that class's fields.

Every source yields plain `str` documents per split ("train" or "val") and has a `fingerprint()` that
changes whenever its content (or the split rule) changes; caches downstream key on it.
"""

from __future__ import annotations

import dataclasses
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")


class DataWarning(UserWarning):
    """Usable but suspect input (a text file with some bytes that are not UTF-8), or a damaged cache
    entry that is being rebuilt."""


def warn_damaged(path: Path, why: str) -> None:
    """One warning for a cache entry that fails its check and is rebuilt from the source."""
    warnings.warn(f"{path}: damaged cache entry ({why}); rebuilding it", DataWarning, stacklevel=3)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class TextSource(ABC):
    """A corpus with a fixed train/val partition of its documents.

    Subclasses are dataclasses whose fields are their settings (the keys of `data.source`), except
    `RUNTIME_FIELDS`, which the pipeline passes in (the cache root).
    """

    kind: ClassVar[str]
    streaming: ClassVar[bool] = False  # True: documents are read on the fly for training, not pre-tokenized
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("cache_dir",)

    @abstractmethod
    def documents(self, split: Split) -> Iterator[str]:
        """The documents of one split, in a fixed order."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Identity of the content and the split rule (cache key)."""

    def prepare(self) -> None:  # noqa: B027 - optional hook; most sources need no preparation
        """Fetch or build whatever `documents` needs (called once, on one process per node)."""

    def describe(self) -> str:
        return self.kind

    def val_hint(self) -> str:
        """What to change when the validation split is too small ('' if nothing source-specific)."""
        return ""

    @classmethod
    def settings(cls) -> list[str]:
        """The config keys of this source (its dataclass fields a user sets)."""
        return [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.init and f.name not in cls.RUNTIME_FIELDS]

    def to_dict(self) -> dict[str, Any]:
        """The `data.source` node that builds this source again."""
        return {"kind": self.kind, **{name: getattr(self, name) for name in self.settings()}}
