"""Write a directory so that readers see either the old complete folder or the new complete folder."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_target(target: Path, force: bool) -> None:
    """Refuse a target that is a file, or a non-empty directory unless `force`."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise FileExistsError(f"{target} is not empty; pass force=True (osp export --force) to replace it")


@contextmanager
def atomic_directory(target: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh sibling directory of `target`; when the block succeeds it becomes `target`.

    A sibling (same parent, so the same file system) makes the final step a rename. An existing target is
    renamed aside first and deleted only once the new folder is in place, so a crash at any point leaves
    either the old or the new folder complete (plus, at worst, a hidden leftover sibling).
    """
    target = Path(target)
    check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()  # mkdir (not mkdtemp) so the folder gets the usual umask permissions, not 0700
    try:
        yield tmp
        check_target(target, force)  # someone may have written there while we worked
        old = target.parent / f".{target.name}.old-{tag}"
        if target.exists():
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if old.exists():
                os.rename(old, target)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
