"""The demo corpus: Jane Austen's six novels (+ a public-domain English bible, optional), fetched from
Debian packages with `apt-get download` (or a folder of .deb files) and extracted in pure Python into the
cache (`osp.data.demo.extract` has the readers). Validation: *Persuasion* and three bible books; training
never sees them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from osp.atomic import write_json, write_text
from osp.data.cache import cache_root, file_lock, file_sha256, fingerprint
from osp.data.demo.extract import extract_austen, extract_bible_books, read_deb_files
from osp.data.sources import Split, TextSource, check_split, warn_damaged
from osp.errors import DataError

# Bumped when an extractor changes its output, so that old caches are rebuilt.
EXTRACTOR_VERSION = 1
AUSTEN_VALIDATION = ("persuasion",)
# Books without close parallels elsewhere (unlike Kings/Chronicles, the synoptic gospels, or
# Daniel/Esther and their Greek versions), so validation text is not near-duplicated in training.
BIBLE_VALIDATION = ("Ruth", "Eccl", "Acts")
APT_HELP = (
    "On a Debian/Ubuntu machine with network access run\n"
    "    apt-get download r-cran-janeaustenr sword-text-web\n"
    "and point osp at the folder that holds the .deb files (data.source.deb_dir=/that/folder or "
    "OSP_DEMO_DEB_DIR=/that/folder), or train on your own text instead: "
    "data=files data.source.paths='/path/to/*.txt'."
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
    kind: ClassVar[str] = "demo"
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
        check_split(split)
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
