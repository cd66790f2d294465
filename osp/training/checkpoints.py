"""Checkpoints that survive: atomic writes, finding the latest one of a run, and the RNG state they carry.

A Lightning checkpoint of an osp run is either one file (`cpu`, `gpu`, `ddp`) or, under `trainer=fsdp`, a
folder of per-rank shards plus `meta.pt` (torch.distributed.checkpoint). Both are written under a
temporary name and moved into place when complete (`AtomicCheckpointIO`, `FSDP2Strategy`), so a run
killed while saving still has its previous checkpoint.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from osp.atomic import replace_path
from osp.torch_files import DISTRIBUTED_META, load_torch_file

LAST = "last.ckpt"
CHECKPOINT_SUFFIX = ".ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `<path>.tmp` in the same folder, fsync, then rename over `<path>`.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the system
    temp dir, so its final move can be a copy across file systems and is not atomic.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.with_name(final.name + ".tmp")
        try:
            with open(staging, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException as err:
            staging.unlink(missing_ok=True)
            # A failed write() (disk full, quota) names no file; torch.save may wrap it in a RuntimeError.
            fault = err if isinstance(err, OSError) else err.__context__
            if isinstance(fault, OSError) and fault.filename is None and fault.errno is not None:
                raise OSError(fault.errno, os.strerror(fault.errno), str(final)) from None
            raise
        replace_path(staging, final)


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
        raise ValueError(f"{path} is not a Lightning checkpoint (no global_step)")
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
        key = (step, path.name == LAST, path.name)  # the name breaks remaining ties the same way on every rank
        if best is None or key > best:
            best = key
    return None if best is None else folder / best[2]


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint to resume from: `resume` = null | auto | a checkpoint (file or folder) | a run dir.

    auto: the latest checkpoint of this run (`run_dir/checkpoints`), or None for a fresh run.
    """
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        latest = latest_checkpoint(run_dir / "checkpoints")
        return None if latest is None else str(latest)
    path = Path(str(resume))
    if path.is_file() or is_distributed_checkpoint(path):
        return str(path)
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            latest = latest_checkpoint(folder)
            if latest is not None:
                return str(latest)
    raise FileNotFoundError(f"resume={resume!r}: no checkpoint there (expected a .ckpt file, a distributed "
                            "checkpoint folder, or a run dir with checkpoints/)")


# RNG -------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, numpy, python), as tensors and plain values
    (so that checkpoints stay loadable with torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the RNG states captured by `capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
