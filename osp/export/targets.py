"""The export target policy on top of osp.atomic: readers see either the old complete export or the new
complete one, and `--force` never replaces anything but an earlier export.

`force` replaces a folder only when everything in it is an export's (config, weights, tokenizer, custom
code), and a file only when it is a GGUF file: a run dir, its checkpoints, a folder that holds the source
run, or any other folder or file is refused, with or without `force`.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from osp.atomic import atomic_path
from osp.errors import OutputExistsError

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
    """Refuse a target folder that is not empty (unless `force`, and then only an earlier export), or a
    file."""
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} exists and is not a directory")
    if not (target.is_dir() and any(target.iterdir())):
        return
    if not force:
        raise OutputExistsError(f"{target} is not empty; pass force=True (osp export --force) to replace an "
                              "earlier export there")
    others = not_export_entries(target)
    if others:
        shown = ", ".join(others[:4]) + (" ..." if len(others) > 4 else "")
        raise OutputExistsError(f"{target} holds files that are not an export ({shown}); osp export replaces "
                              "only an earlier export, even with --force: choose another target")
    if not (target / "config.json").is_file():  # e.g. a run's tokenizer/ folder: export-named files only
        raise OutputExistsError(f"{target} is not an earlier export (no config.json); osp export replaces "
                              "only an earlier export, even with --force: choose another target")


def check_file_target(target: Path, force: bool) -> None:
    """Refuse a folder, or an existing file (unless `force`, and then only a GGUF file)."""
    if target.is_dir():
        raise OutputExistsError(f"{target} is a directory")
    if not target.exists():
        return
    if not force:
        raise OutputExistsError(f"{target} exists; pass force=True (osp export --force) to replace it")
    with open(target, "rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise OutputExistsError(f"{target} is not a GGUF file; osp export replaces only an earlier "
                                  "export, even with --force: choose another target")


@contextmanager
def atomic_directory(target: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh folder beside `target`; when the block succeeds it becomes `target` (osp.atomic: an
    earlier export is renamed aside and removed only once the new one is in place). The target policy is
    checked before and again just before the rename (someone may have written there meanwhile)."""
    target = Path(target)
    check_target(target, force)
    with atomic_path(target, replace_folder=True) as tmp:
        tmp.mkdir()  # mkdir (not mkdtemp) so the folder gets the usual umask permissions, not 0700
        yield tmp
        check_target(target, force)


@contextmanager
def atomic_file(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; when the block succeeds it replaces `target` (one rename)."""
    check_file_target(target, force)
    with atomic_path(target) as tmp:
        yield tmp
        check_file_target(target, force)
