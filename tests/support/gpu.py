"""The environment of `osp` subprocesses in the GPU suite (tests/gpu)."""

from __future__ import annotations

import os

from tests.support.cli import REPO
from tests.support.training import subprocess_env


def gpu_env(**extra: str) -> dict[str, str]:
    """Environment of `osp` subprocesses: the training suite's (one CPU thread, no inherited run id), with
    the compiled kernels (TRITON_INTERPRET=0) and the test callbacks importable (repo root on PYTHONPATH)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess_env(TRITON_INTERPRET="0", PYTHONPATH=path, **extra)
