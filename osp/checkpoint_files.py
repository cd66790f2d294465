"""Checkpoint files: reading what torch.save (and Lightning) wrote, with one error for a truncated or foreign
file, and the one rule for which checkpoint a path stands for.

A Lightning checkpoint of an osp run is either one file (`cpu`, `gpu`, `ddp`) or, under `trainer=fsdp`, a
folder of per-rank shards with DCP's `.metadata` and Lightning's `meta.pt` (a folder without both is an
incomplete write, never a checkpoint). A run dir stands for its newest readable checkpoint: the highest
global step in `<run_dir>/checkpoints`, last.ckpt winning a tie (training writes the final state to
last.ckpt whatever the checkpoint interval). Resume, `osp eval`, `osp export` and the benches all resolve
paths through `resolve_checkpoint` / `latest_checkpoint`.
"""

from __future__ import annotations

import logging
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from osp.errors import CheckpointError, PathNotFoundError

DISTRIBUTED_META = "meta.pt"  # Lightning's non-tensor part of a distributed (FSDP2) checkpoint folder
LAST = "last.ckpt"
CHECKPOINT_SUFFIX = ".ckpt"

log = logging.getLogger(__name__)


def load_torch_file(path: Path) -> Any:
    """The object in a torch.save file, memory-mapped (tensors are read only when used).

    The safe loader first; objects it refuses (Lightning's callback states, hyper-parameters) are unpickled
    in full, as osp only reads files its own runs wrote. A truncated, foreign or unreadable file raises a
    CheckpointError that names it.
    """
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):  # torch's own error would be about mmap
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint (missing, truncated, or not a "
                              "file torch.save wrote)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        log.info("osp: %s holds non-tensor objects; loading it with weights_only=False", path)
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({err})") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # any unpickling failure means a corrupt or foreign file
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({err})") from err


def is_distributed_checkpoint(path: Path) -> bool:
    """A complete torch.distributed.checkpoint folder as Lightning writes it (DCP metadata plus meta.pt)."""
    return path.is_dir() and (path / ".metadata").is_file() and (path / DISTRIBUTED_META).is_file()


def checkpoint_metadata(path: Path) -> dict[str, Any]:
    """Everything but the tensors of a Lightning checkpoint (file or distributed folder): global_step,
    loops, callbacks, osp's extras. Files are memory-mapped, so their tensors are not read."""
    target = path / DISTRIBUTED_META if path.is_dir() else path
    return load_torch_file(target)


def checkpoint_step(path: Path) -> int:
    """The global step a Lightning checkpoint (file or distributed folder) was saved at."""
    checkpoint = checkpoint_metadata(path)
    if not isinstance(checkpoint, dict) or "global_step" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no global_step)")
    return int(checkpoint["global_step"])


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint in `folder` with the highest global step (last.ckpt wins a tie); None if there is none.

    Unreadable entries (a file cut short by a crash, a folder without its metadata) are skipped with
    a warning, so a damaged last.ckpt falls back to the newest step checkpoint.
    """
    best: tuple[int, bool, str] | None = None
    if not folder.is_dir():
        return None
    for path in folder.iterdir():
        if path.suffix != CHECKPOINT_SUFFIX or not (path.is_file() or path.is_dir()):
            continue
        if path.is_dir() and not is_distributed_checkpoint(path):
            warnings.warn(f"skipping {path}: not a complete distributed checkpoint", stacklevel=2)
            continue
        try:
            step = checkpoint_step(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, never fatal
            warnings.warn(f"skipping {path}: cannot be read ({err})", stacklevel=2)
            continue
        # the name breaks remaining ties the same way on every rank
        key = (step, path.name == LAST, path.name)
        if best is None or key > best:
            best = key
    return None if best is None else folder / best[2]


def run_dir_of(checkpoint: Path) -> Path:
    """<run_dir> of <run_dir>/checkpoints/<name>.ckpt (else the checkpoint's own folder)."""
    parent = checkpoint.parent
    return parent.parent if parent.name == "checkpoints" else parent


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint `path` stands for: itself (a .ckpt file or a complete distributed folder), or the newest
    checkpoint of a run dir (or of a checkpoints/ folder)."""
    path = Path(path)
    if not path.exists():
        raise PathNotFoundError(f"{path} does not exist")
    if path.is_file() or is_distributed_checkpoint(path):
        return path
    if path.is_dir() and (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: distributed checkpoint without {DISTRIBUTED_META} "
                              "(an incomplete write); use another checkpoint of the run")
    for folder in (path / "checkpoints", path):
        latest = latest_checkpoint(folder)
        if latest is not None:
            return latest
    raise CheckpointError(f"{path}: not a checkpoint, a run dir with checkpoints/, or an exported folder "
                          "(no config.json)")
