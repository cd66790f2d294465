"""Checkpoints that survive: atomic writes, the checkpoint a resume starts from, and the RNG state they carry.

Checkpoints (files, or FSDP2 folders) are written under a temporary name and moved into place when complete
(`AtomicCheckpointIO`, `FSDP2Strategy`), so a run killed while saving still has its previous checkpoint.
Which checkpoint a path stands for is osp.checkpoint_files' rule.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint

from osp.atomic import replace_path
from osp.checkpoint_files import LAST, latest_checkpoint, resolve_checkpoint
from osp.errors import CheckpointError, PathNotFoundError


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


def save_last(trainer: L.Trainer) -> Path:
    """Write the current state to last.ckpt where ModelCheckpoint keeps it (collective: every rank calls it),
    as ModelCheckpoint's own last checkpoint: a resumed run keeps writing this file (no `last-v1.ckpt`)."""
    keeper = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None)
    if keeper is not None and keeper.dirpath:
        path = Path(keeper.dirpath) / (keeper.CHECKPOINT_NAME_LAST + keeper.FILE_EXTENSION)
        keeper.last_model_path = str(path)
        keeper._last_global_step_saved = trainer.global_step  # noqa: SLF001 - what ModelCheckpoint checks
    else:
        path = Path(trainer.default_root_dir) / "checkpoints" / LAST
    trainer.save_checkpoint(path, weights_only=False)
    return path


class FinalCheckpoint(L.Callback):
    """last.ckpt is the end of the run: when training ends at a step that ModelCheckpoint's interval did not
    save (max_steps not a multiple of every_n_train_steps), the final state is written to last.ckpt, so
    `osp export RUN_DIR`, `osp eval RUN_DIR` and a resume all start from the end. Runs that keep no
    checkpoints (callbacks.checkpoint=null) stay without one. Added by osp train to every run."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        keeper = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None)
        if keeper is None or not keeper.save_last or keeper._last_global_step_saved == trainer.global_step:  # noqa: SLF001
            return
        save_last(trainer)


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint to resume from: `resume` = null | auto | a checkpoint (file or folder) | a run dir.

    auto: the newest checkpoint of this run (`run_dir/checkpoints`), or None for a fresh run.
    """
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        latest = latest_checkpoint(run_dir / "checkpoints")
        return None if latest is None else str(latest)
    try:
        return str(resolve_checkpoint(Path(str(resume))))
    except (CheckpointError, PathNotFoundError) as err:
        raise PathNotFoundError(f"resume={resume!r}: no checkpoint there (expected a .ckpt file, "
                                f"a distributed checkpoint folder, or a run dir with checkpoints/): {err}"
                                ) from None


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
