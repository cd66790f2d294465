"""Write an export so that readers see either the old complete one or the new complete one, and never let
`--force` replace anything but an earlier export.

`force` replaces a folder only when everything in it is an export's (config, weights, tokenizer, custom
code), and a file only when it is a GGUF file: a run dir, its checkpoints, a folder that holds the source
run, or any other folder or file is refused, with or without `force`.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# What osp export writes into a folder (hf.py, the tokenizer, the custom-code files, Python's bytecode cache).
EXPORT_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "vocab.json", "merges.txt", "added_tokens.json", "configuration_osp.py", "modeling_osp.py",
                "__pycache__", "*.gguf")
GGUF_MAGIC = b"GGUF"


def not_export_entries(folder: Path) -> list[str]:
    """Names in `folder` that an osp export does not write."""
    return sorted(p.name for p in folder.iterdir()
                  if not any(fnmatch.fnmatch(p.name, pattern) for pattern in EXPORT_FILES))


def check_target(target: Path, force: bool) -> None:
    """Refuse a target folder that is not empty (unless `force`, and then only an earlier export), or a file."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if not (target.is_dir() and any(target.iterdir())):
        return
    if not force:
        raise FileExistsError(f"{target} is not empty; pass force=True (osp export --force) to replace an "
                              "earlier export there")
    others = not_export_entries(target)
    if others:
        shown = ", ".join(others[:4]) + (" ..." if len(others) > 4 else "")
        raise FileExistsError(f"{target} holds files that are not an export ({shown}); osp export replaces "
                              "only an earlier export, even with --force: choose another target")


def check_file_target(target: Path, force: bool) -> None:
    """Refuse a folder, or an existing file (unless `force`, and then only a GGUF file)."""
    if target.is_dir():
        raise FileExistsError(f"{target} is a directory")
    if not target.exists():
        return
    if not force:
        raise FileExistsError(f"{target} exists; pass force=True (osp export --force) to replace it")
    with open(target, "rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise FileExistsError(f"{target} is not a GGUF file; osp export replaces only an earlier export, "
                                  "even with --force: choose another target")


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


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
    tmp, old = _sibling(target, "tmp"), _sibling(target, "old")
    tmp.mkdir()  # mkdir (not mkdtemp) so the folder gets the usual umask permissions, not 0700
    try:
        yield tmp
        check_target(target, force)  # someone may have written there while we worked
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


@contextmanager
def atomic_file(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path of `target`; when the block succeeds it replaces `target`.

    Same directory, so os.replace is an atomic rename: readers see the old file or the complete new one,
    never a partial one, and a failure removes the temporary file.
    """
    check_file_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        check_file_target(target, force)  # someone may have written there while we worked
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
