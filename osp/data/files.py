"""Local text files: `.txt`, `.jsonl`/`.json` (one JSON object per line) and `.parquet`, by glob, optionally
gzip-compressed (`.txt.gz`, `.jsonl.gz`).

A `.txt` file is one document by default (a book or an article keeps its paragraphs together);
`txt_documents="paragraphs"` splits on blank lines instead, for files that hold many short texts.
Validation is `val_paths`, or the documents whose content hash falls below `val_fraction`.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from osp.data.cache import fingerprint
from osp.data.sources import DataWarning, Split, TextSource, check_split
from osp.errors import DataError

_TEXT_SUFFIXES = (".txt", ".text", ".md")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return Path(name[:-3]).suffix if name.endswith(".gz") else path.suffix.lower()


def _open_bytes(path: Path):  # noqa: ANN202 - a binary file handle
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


MAX_UNDECODABLE = 0.10  # a file with more than this fraction of non-UTF-8 bytes is refused
_warned_files: set[tuple[str, int, int]] = set()


class _Utf8Reader:
    """Decodes one local file's bytes as UTF-8 and enforces the text-file rule.

    Rule: a file that contains a NUL byte is binary (or UTF-16) and is refused at once; a file whose
    undecodable bytes exceed MAX_UNDECODABLE (10%) of its bytes is refused when it has been read;
    a file with fewer is used with U+FFFD in place of the bad bytes, and one DataWarning per file
    (per process) gives their count. Clean text pays one strict decode; the counting fallback runs
    only for a block that fails it, and the NUL test is a memchr-speed `in` on the bytes.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.total, self.bad = path, 0, 0

    def decode(self, raw: bytes) -> str:
        self.total += len(raw)
        if b"\0" in raw:
            raise DataError(f"{self.path}: contains NUL bytes, so it is a binary file or not UTF-8 text "
                            "(UTF-16?): remove it from data.source.paths or convert it to UTF-8")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # Bytes that survive neither decoding: exact, and independent of real U+FFFD in the text.
            self.bad += len(raw) - len(raw.decode("utf-8", "ignore").encode("utf-8"))
            return raw.decode("utf-8", "replace")

    def finish(self) -> None:
        if not self.bad:
            return
        share = self.bad / self.total
        what = f"{self.bad:,} of its {self.total:,} bytes ({share:.1%}) are not valid UTF-8"
        if share > MAX_UNDECODABLE:
            raise DataError(f"{self.path}: {what}; it is not UTF-8 text: remove it from data.source.paths or "
                            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)")
        stat = self.path.stat()
        key = (str(self.path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _warned_files:
            _warned_files.add(key)
            warnings.warn(f"{self.path}: {what}; training on it with U+FFFD in their place",
                          DataWarning, stacklevel=2)


def _expand(patterns: str | Sequence[str]) -> list[Path]:
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [str(patterns)]
    found: dict[str, Path] = {}
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, "**", "*")
        for match in sorted(glob.glob(pattern, recursive=True)):
            path = Path(match)
            if path.is_file() and _suffix(path) in _TEXT_SUFFIXES + _JSONL_SUFFIXES + (".parquet",):
                found.setdefault(str(path.resolve()), path)
    return list(found.values())


def read_documents(path: Path, text_field: str = "text",
                   txt_documents: Literal["file", "paragraphs"] = "file") -> Iterator[str]:
    """Documents of one local file (empty documents are skipped).

    .txt and .jsonl bytes must be UTF-8 text: see `_Utf8Reader` for what is refused and what warned.
    """
    suffix = _suffix(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names}); "
                            "set data.source.text_field")
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            yield from (text for text in batch.column(0).to_pylist() if text)
    elif suffix in _JSONL_SUFFIXES:
        reader = _Utf8Reader(path)
        with _open_bytes(path) as f:
            for line_no, raw in enumerate(f, 1):
                line = reader.decode(raw)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    hint = "; the file is not UTF-8 text either" if reader.bad else ""
                    raise DataError(f"{path}:{line_no}: not a JSON object per line ({err}){hint}") from err
                if not isinstance(record, dict) or text_field not in record:
                    keys = list(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{path}:{line_no}: no field {text_field!r} (found {keys}); "
                                    "set data.source.text_field")
                if record[text_field]:
                    yield str(record[text_field])
        reader.finish()
    else:
        reader = _Utf8Reader(path)
        with _open_bytes(path) as f:
            text = reader.decode(f.read())
        reader.finish()
        if txt_documents == "paragraphs":
            yield from (p.strip() for p in re.split(r"\n\s*\n", text) if p.strip())
        elif text.strip():
            yield text


def _hash_fraction(text: str) -> float:
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass
class LocalFiles(TextSource):
    """Documents from local files matched by glob(s) (`**` recurses; a folder means everything in it).

    Validation is either `val_paths`, or (when that is None) the documents whose content hash falls
    below `val_fraction`: deterministic, order-independent, and identical documents always land in
    the same split, so train and val cannot share a document.
    """

    paths: str | Sequence[str]
    val_paths: str | Sequence[str] | None = None
    val_fraction: float = 0.01
    text_field: str = "text"
    txt_documents: Literal["file", "paragraphs"] = "file"
    kind: ClassVar[str] = "files"

    def __post_init__(self) -> None:
        if self.txt_documents not in ("file", "paragraphs"):
            raise ValueError(f"txt_documents must be 'file' or 'paragraphs', got {self.txt_documents!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def _files(self, patterns: str | Sequence[str] | None, role: str) -> list[Path]:
        if not patterns:
            raise DataError("data.source.paths is empty: give a glob of .txt/.jsonl/.parquet files")
        files = _expand(patterns)
        if not files:
            raise DataError(f"no .txt/.jsonl/.json/.parquet files match {role}={patterns!r}")
        return files

    def train_files(self) -> list[Path]:
        return self._files(self.paths, "paths")

    def val_files(self) -> list[Path]:
        return self._files(self.val_paths, "val_paths") if self.val_paths else []

    def documents(self, split: Split) -> Iterator[str]:
        check_split(split)
        if self.val_paths:
            files = self.train_files() if split == "train" else self.val_files()
            for path in files:
                yield from read_documents(path, self.text_field, self.txt_documents)
            return
        for path in self.train_files():
            for doc in read_documents(path, self.text_field, self.txt_documents):
                if (_hash_fraction(doc) < self.val_fraction) == (split == "val"):
                    yield doc

    def fingerprint(self) -> str:
        # Size + modification time, like make: hashing a large corpus on every start would be slow.
        def stat(paths: list[Path]) -> list[tuple[str, int, int]]:
            return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]

        return fingerprint("files", stat(self.train_files()), stat(self.val_files()),
                           None if self.val_paths else self.val_fraction, self.text_field, self.txt_documents)

    def describe(self) -> str:
        return f"files {self.paths!r}"

    def val_hint(self) -> str:
        if self.val_paths:
            return ""
        return f"data.source.val_fraction is {self.val_fraction}: raise it or set data.source.val_paths"
