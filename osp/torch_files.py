"""Reading what torch.save (and Lightning) wrote, with one error for a truncated or foreign file.

Training (resume, latest checkpoint) and export (loading a checkpoint) both read checkpoints through here.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

DISTRIBUTED_META = "meta.pt"  # Lightning's non-tensor part of a distributed (FSDP2) checkpoint folder

log = logging.getLogger(__name__)


def load_torch_file(path: Path) -> Any:
    """The object in a torch.save file, memory-mapped (tensors are read only when used).

    The safe loader first; objects it refuses (Lightning's callback states, hyper-parameters) are unpickled
    in full, as osp only reads files its own runs wrote. A truncated, foreign or unreadable file raises a
    ValueError that names it.
    """
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):  # torch's own error would be about mmap
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint (missing, truncated, or not a file "
                         "torch.save wrote)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        log.info("osp: %s holds non-tensor objects; loading it with weights_only=False", path)
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({err})") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # any unpickling failure means a corrupt or foreign file
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({err})") from err
