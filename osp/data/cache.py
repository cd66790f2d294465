"""Cache location, content hashing and an inter-process lock for the data pipeline (atomic writes:
osp.atomic).

Everything the pipeline builds (extracted corpora, trained tokenizers, token shards) lives under one
root so that `osp data info` can show it and a user can delete it in one place:
`$OSP_CACHE_DIR`, else `$XDG_CACHE_HOME/osp`, else `~/.cache/osp`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The directory that holds corpora, tokenizers and shards."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("OSP_CACHE_DIR"):
        return Path(os.environ["OSP_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "osp"


def fingerprint(*parts: Any) -> str:
    """A stable hex digest of JSON-serializable parts (cache keys)."""
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock across processes (filelock: flock on POSIX, released when a holder dies), so that DDP
    ranks build a cache entry once and the rest reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


def human_bytes(n: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"
