"""Text sources: where documents come from, and which of them are held out for validation.

Three kinds, chosen by `build_source(kind, ...)`:

- `demo`  — Jane Austen's six novels (+ a public-domain English bible, optional), fetched from
            Debian packages with `apt-get download` and extracted in pure Python into the cache.
            Validation: *Persuasion* and three bible books; training never sees them.
- `files` — local `.txt`, `.jsonl`/`.json` (one JSON object per line) and `.parquet` files by glob,
            optionally gzip-compressed (`.txt.gz`, `.jsonl.gz`). A `.txt` file is one document by
            default (a book or an article keeps its paragraphs together); `txt_documents="paragraphs"`
            splits on blank lines instead, for files that hold many short texts.
- `hub`   — a Hugging Face hub dataset, streamed in its stored order (no shuffle buffer), for real runs.

Every source yields plain `str` documents per split ("train" or "val") and has a `fingerprint()`
that changes whenever its content (or the split rule) changes; caches downstream key on it.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from osp.atomic import write_json, write_text
from osp.data.cache import cache_root, file_lock, file_sha256, fingerprint
from osp.data.extract import extract_austen, extract_bible_books, read_deb_files

Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")
SOURCE_KINDS = ("demo", "files", "hub")


class DataError(RuntimeError):
    """Missing, empty or unusable data, with a message that says what to do."""


class DataWarning(UserWarning):
    """Usable but suspect input (a text file with some bytes that are not UTF-8), or a damaged cache
    entry that is being rebuilt."""


def warn_damaged(path: Path, why: str) -> None:
    """One warning for a cache entry that fails its check and is rebuilt from the source."""
    warnings.warn(f"{path}: damaged cache entry ({why}); rebuilding it", DataWarning, stacklevel=3)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class TextSource(ABC):
    """A corpus with a fixed train/val partition of its documents."""

    kind: str
    streaming: bool = False  # True: documents are read on the fly for training, not pre-tokenized

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


# ---------------------------------------------------------------------------------------------
# demo: Austen (+ bible) from Debian packages
# ---------------------------------------------------------------------------------------------

# Bumped when an extractor changes its output, so that old caches are rebuilt.
EXTRACTOR_VERSION = 1
AUSTEN_VALIDATION = ("persuasion",)
# Books without close parallels elsewhere (unlike Kings/Chronicles, the synoptic gospels, or
# Daniel/Esther and their Greek versions), so validation text is not near-duplicated in training.
BIBLE_VALIDATION = ("Ruth", "Eccl", "Acts")
APT_HELP = (
    "On a Debian/Ubuntu machine with network access run\n"
    "    apt-get download r-cran-janeaustenr sword-text-web\n"
    "and point osp at the folder that holds the .deb files (data.deb_dir=/that/folder or "
    "OSP_DEMO_DEB_DIR=/that/folder), or train on your own text instead: "
    "data=files data.paths='/path/to/*.txt'."
)


@dataclass(frozen=True)
class _DemoComponent:
    name: str  # cache folder; also the prefix of document names
    package: str
    member: str  # substring selecting the package files the extractor needs


_AUSTEN = _DemoComponent("austen", "r-cran-janeaustenr", "/data/Rdata.rdb")
_BIBLE = _DemoComponent("web_bible", "sword-text-web", "/modules/texts/ztext/")


def _find_deb(package: str, folder: Path) -> Path | None:
    candidates = sorted(folder.glob(f"{package}_*.deb"))
    return candidates[-1] if candidates else None


def _apt_get(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["apt-get", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as err:
        raise DataError(f"`apt-get {' '.join(args)}` did not finish in 10 minutes.\n{APT_HELP}") from err


def download_deb(package: str, workdir: Path, deb_dir: Path | None = None) -> Path:
    """A local .deb of `package`: from `deb_dir` if given, else via `apt-get download` into `workdir`."""
    if deb_dir is not None:
        found = _find_deb(package, deb_dir)
        if found is None:
            raise DataError(f"no {package}_*.deb in {deb_dir}.\n{APT_HELP}")
        return found
    if shutil.which("apt-get") is None:
        raise DataError(f"the demo corpus needs the Debian package {package!r}, but apt-get is not "
                        f"available.\n{APT_HELP}")
    result = _apt_get(["download", package], workdir)
    if result.returncode != 0:
        # A fresh machine (or container) often has no package lists yet.
        update = _apt_get(["update"], workdir)
        result = _apt_get(["download", package], workdir) if update.returncode == 0 else update
    found = _find_deb(package, workdir)
    if result.returncode != 0 or found is None:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DataError(f"`apt-get download {package}` failed: {' | '.join(detail)}\n"
                        "(`apt-get update` needs root; without network access use the .deb files from "
                        f"another machine.)\n{APT_HELP}")
    return found


def _extract_component(component: _DemoComponent, deb: Path) -> dict[str, str]:
    """{document name: text} for one demo package."""
    files = read_deb_files(deb, lambda path: component.member in path)
    if not files:
        raise DataError(f"{deb} does not contain {component.member!r}; is it the right package?")
    if component is _AUSTEN:
        (rdb,) = files.values()
        return extract_austen(rdb)
    with tempfile.TemporaryDirectory() as tmp:
        module_dir = Path(tmp)
        for path, data in files.items():
            (module_dir / Path(path).name).write_bytes(data)
        books = extract_bible_books(module_dir)
    return {f"{i:02d}_{book}": text for i, (book, text) in enumerate(books)}


def _is_validation(component: _DemoComponent, doc_name: str) -> bool:
    if component is _AUSTEN:
        return doc_name in AUSTEN_VALIDATION
    return doc_name.split("_", 1)[1] in BIBLE_VALIDATION


@dataclass
class DemoCorpus(TextSource):
    """Austen's novels (+ the bible) from Debian packages, extracted once into the cache."""

    include_bible: bool = True
    cache_dir: str | None = None
    deb_dir: str | None = None  # folder with the .deb files, for machines where apt-get cannot fetch them
    kind: str = field(default="demo", init=False)
    _verified: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def _components(self) -> list[_DemoComponent]:
        return [_AUSTEN, _BIBLE] if self.include_bible else [_AUSTEN]

    def _folder(self, component: _DemoComponent) -> Path:
        return cache_root(self.cache_dir) / "corpus" / component.name

    def _manifest(self, component: _DemoComponent, quiet: bool = False) -> dict[str, Any] | None:
        path = self._folder(component) / "manifest.json"
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, OSError):  # damaged cache entry: extract again
            return None
        if not isinstance(manifest, dict) or manifest.get("extractor_version") != EXTRACTOR_VERSION:
            return None
        folder = self._folder(component)
        hashed = component.name in self._verified  # sha256 once per instance, sizes every time
        for d in manifest["documents"]:
            path = folder / d["file"]
            if not path.exists() or path.stat().st_size != d["bytes"] or (
                    not hashed and file_sha256(path) != d["sha256"]):
                if not quiet:
                    warn_damaged(path, "missing, or its size or sha256 differs from manifest.json")
                return None
        self._verified.add(component.name)
        return manifest

    def _build(self, component: _DemoComponent) -> dict[str, Any]:
        folder = self._folder(component)
        with file_lock(folder.parent / f".{component.name}.lock"):
            manifest = self._manifest(component, quiet=True)
            if manifest is not None:  # another process finished it while we waited
                return manifest
            deb_dir = self.deb_dir or os.environ.get("OSP_DEMO_DEB_DIR")
            with tempfile.TemporaryDirectory(prefix="osp-deb-") as workdir:
                deb = download_deb(component.package, Path(workdir), Path(deb_dir) if deb_dir else None)
                documents = _extract_component(component, deb)
            if not documents:
                raise DataError(f"{deb.name}: the extractor found no text")
            entries = []
            for name, text in documents.items():
                path = folder / f"{name}.txt"
                write_text(path, text)
                entries.append({
                    "name": name, "file": path.name, "bytes": path.stat().st_size, "chars": len(text),
                    "sha256": file_sha256(path),
                    "split": "val" if _is_validation(component, name) else "train",
                })
            manifest = {"extractor_version": EXTRACTOR_VERSION, "package": deb.name, "documents": entries}
            # The manifest is written last: its presence marks a complete extraction.
            write_json(folder / "manifest.json", manifest)
            return manifest

    def manifests(self) -> dict[str, dict[str, Any]]:
        """{component: manifest}, fetching and extracting whatever is missing."""
        return {c.name: self._manifest(c) or self._build(c) for c in self._components()}

    def prepare(self) -> None:
        self.manifests()

    def files(self, split: Split) -> list[Path]:
        _check_split(split)
        return [self._folder(c) / d["file"]
                for c, manifest in zip(self._components(), self.manifests().values(), strict=True)
                for d in manifest["documents"] if d["split"] == split]

    def documents(self, split: Split) -> Iterator[str]:
        for path in self.files(split):
            yield path.read_text(encoding="utf-8")

    def fingerprint(self) -> str:
        manifests = self.manifests()
        return fingerprint("demo", {name: [(d["name"], d["sha256"], d["split"]) for d in m["documents"]]
                                    for name, m in manifests.items()})

    def describe(self) -> str:
        return "demo (austen" + (" + web_bible)" if self.include_bible else ")")


# ---------------------------------------------------------------------------------------------
# files: local text / jsonl / parquet
# ---------------------------------------------------------------------------------------------

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
                            "(UTF-16?): remove it from data.paths or convert it to UTF-8")
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
            raise DataError(f"{self.path}: {what}; it is not UTF-8 text: remove it from data.paths or "
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
                            "set data.text_field")
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
                                    "set data.text_field")
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
    kind: str = field(default="files", init=False)

    def __post_init__(self) -> None:
        if self.txt_documents not in ("file", "paragraphs"):
            raise ValueError(f"txt_documents must be 'file' or 'paragraphs', got {self.txt_documents!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def _files(self, patterns: str | Sequence[str] | None, role: str) -> list[Path]:
        if not patterns:
            raise DataError("data.paths is empty: give a glob of .txt/.jsonl/.parquet files")
        files = _expand(patterns)
        if not files:
            raise DataError(f"no .txt/.jsonl/.json/.parquet files match {role}={patterns!r}")
        return files

    def train_files(self) -> list[Path]:
        return self._files(self.paths, "paths")

    def val_files(self) -> list[Path]:
        return self._files(self.val_paths, "val_paths") if self.val_paths else []

    def documents(self, split: Split) -> Iterator[str]:
        _check_split(split)
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


# ---------------------------------------------------------------------------------------------
# hub: Hugging Face datasets, streamed
# ---------------------------------------------------------------------------------------------


@dataclass
class HubDataset(TextSource):
    """A Hugging Face dataset read with `datasets.load_dataset(..., streaming=True)`, in stored order.

    Validation is `val_split` if given, else the first `val_docs` documents of `split` (which
    training then skips). Under DDP each rank streams a disjoint share of the documents
    (`datasets.distributed.split_dataset_by_node`: whole files per rank when they divide evenly).
    `data_files` passes through to `load_dataset` (e.g. name="json" with local files).
    """

    name: str
    config_name: str | None = None
    split: str = "train"
    val_split: str | None = None
    val_docs: int = 1000
    text_field: str = "text"
    revision: str | None = None
    data_files: Any = None
    kind: str = field(default="hub", init=False)
    streaming: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise DataError("data.name is empty: give a hub dataset, e.g. HuggingFaceFW/fineweb-edu")
        if self.val_split is None and self.val_docs <= 0:
            raise ValueError("val_docs must be positive when val_split is not set")

    def _load(self, split: str):  # noqa: ANN202 - datasets.IterableDataset
        import datasets

        try:
            return datasets.load_dataset(self.name, self.config_name, split=split, streaming=True,
                                         revision=self.revision, data_files=self.data_files)
        except Exception as err:  # network, auth, or a wrong name: say which dataset and why
            raise DataError(f"cannot open hub dataset {self.name!r} (config {self.config_name!r}, split "
                            f"{split!r}): {type(err).__name__}: {err}") from err

    def stream(self, split: Split, rank: int = 0, world_size: int = 1) -> Iterator[str]:
        """Documents of `split`; for training under DDP, only this rank's share."""
        _check_split(split)
        if split == "val":
            if self.val_split:
                dataset = self._load(self.val_split)
            else:
                dataset = self._load(self.split).take(self.val_docs)
        else:
            dataset = self._load(self.split)
            if not self.val_split:
                dataset = dataset.skip(self.val_docs)
            if world_size > 1:
                from datasets.distributed import split_dataset_by_node

                dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        for record in dataset:
            if self.text_field not in record:
                raise DataError(f"hub dataset {self.name!r} has no field {self.text_field!r} "
                                f"(fields: {list(record)}); set data.text_field")
            if record[self.text_field]:
                yield str(record[self.text_field])

    def documents(self, split: Split) -> Iterator[str]:
        return self.stream(split)

    def fingerprint(self) -> str:
        return fingerprint("hub", self.name, self.config_name, self.split, self.val_split, self.val_docs,
                           self.text_field, self.revision, self.data_files)

    def describe(self) -> str:
        return f"hub {self.name}" + (f" ({self.config_name})" if self.config_name else "")


def build_source(kind: str, *, paths: str | Sequence[str] | None = None,
                 val_paths: str | Sequence[str] | None = None, val_fraction: float = 0.01,
                 name: str | None = None, config_name: str | None = None, split: str = "train",
                 val_split: str | None = None, val_docs: int = 1000, revision: str | None = None,
                 data_files: Any = None, text_field: str = "text",
                 txt_documents: Literal["file", "paragraphs"] = "file", include_bible: bool = True,
                 deb_dir: str | None = None, cache_dir: str | None = None) -> TextSource:
    """The text source named by `kind` ("demo" | "files" | "hub") from plain config values."""
    if kind == "demo":
        return DemoCorpus(include_bible=include_bible, cache_dir=cache_dir, deb_dir=deb_dir)
    if kind == "files":
        return LocalFiles(paths=paths or [], val_paths=val_paths, val_fraction=val_fraction,
                          text_field=text_field, txt_documents=txt_documents)
    if kind == "hub":
        return HubDataset(name=name or "", config_name=config_name, split=split, val_split=val_split,
                          val_docs=val_docs, text_field=text_field, revision=revision, data_files=data_files)
    raise ValueError(f"data.source must be one of {SOURCE_KINDS}, got {kind!r}")
