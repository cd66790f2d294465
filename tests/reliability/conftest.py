"""Shared pieces of the fault catalogue: `osp` subprocesses, one trained tiny run, snapshots of a run dir.

The rule every test checks: a user input or environment fault ends in one line that names the problem and
the fix, with a non-zero exit code and no traceback, and every earlier artefact is left as it was.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from osp.checkpoint_files import checkpoint_step
from tests.support.cli import RUN, osp, strict_json, train_args


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory) -> Path:  # noqa: F811
    """One finished tiny run, shared read-only; tests that change it work on `run_copy`."""
    root = tmp_path_factory.mktemp("reliability_runs")
    proc = osp(*train_args(corpus, root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = root / RUN
    names = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert {"last.ckpt", "step0000002.ckpt", "step0000004.ckpt"} <= names
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 5  # the end, not the last interval step
    summary = strict_json(run_dir / "summary.json")
    assert summary["status"] == "finished" and summary["steps"] == 5 and math.isfinite(summary["val_loss"])
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A private copy of the shared run, at <tmp_path>/runs/base (runs_root = its parent)."""
    target = tmp_path / "runs" / RUN
    shutil.copytree(trained, target)
    return target
