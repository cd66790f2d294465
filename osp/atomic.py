"""Atomic writes: readers see the old complete file or folder or the new complete one, never a partial one.

Everything osp writes that another step reads back (token shards, tokenizers, the demo corpus, metrics.csv,
checkpoints, summary.json, reports, bench results) goes through these helpers: write to a temporary name
in the same folder (same file system, so the last step is a rename), then rename. Exports add their own
target policy on top (osp.export.targets: `--force` replaces only an earlier export).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], replace_folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` only if the block succeeds.

    A crash or an exception leaves no half-written `target` behind. Works for files and directories. A
    directory target that already exists is kept (another process built the same content first), unless
    `replace_folder`: then the new folder replaces it through `replace_path`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    inner = tmp / target.name
    try:
        yield inner
        usual_modes(inner)
        if inner.is_dir() and target.exists():
            if replace_folder:
                replace_path(inner, target)
            return
        os.replace(inner, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def usual_modes(path: Path) -> None:
    """Give `path` (and everything under it) the modes a plain `open`/`mkdir` would, under this process's
    umask: some writers create their files 0600 (safetensors), which a server running as another user
    could not read."""
    mask = os.umask(0)
    os.umask(mask)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.is_symlink() or not item.exists():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """`target.write_text(text)` (UTF-8), atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    """Strict JSON (NaN and Infinity refused: other readers reject them), paths and the like as strings."""
    write_text(target, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=str) + "\n")


def remove_path(path: Path) -> None:
    """Remove a file, symlink or folder if it exists."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def replace_path(staging: Path, final: Path) -> None:
    """Move the finished `staging` file or folder to `final`, replacing whatever is there.

    File over file is one atomic rename. A folder cannot replace a non-empty folder in one rename, so
    the old one is renamed aside (`final.old`) first and removed only after the new one is in place: at
    every moment one complete copy exists under `final` or `final.old`.
    """
    if not (final.exists() or final.is_symlink()) or (staging.is_file() and not final.is_dir()):
        os.replace(staging, final)
        return
    retired = final.with_name(final.name + ".old")
    remove_path(retired)
    os.replace(final, retired)
    os.replace(staging, final)
    remove_path(retired)
