"""Shared pieces of the fault catalogue: `osp` subprocesses, one trained tiny run, snapshots of a run dir.

The rule every test checks: a user input or environment fault ends in one line that names the problem and
the fix, with a non-zero exit code and no traceback, and every earlier artefact is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import corpus, subprocess_env, tiny_overrides  # noqa: F401 - corpus: fixture

REPO = Path(__file__).resolve().parents[2]
RUN = "base"
# The shared run: 4 steps, checkpoints at steps 2 and 4 (plus last.ckpt), metrics, summary, export.
BASE = ["trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks.checkpoint.every_n_train_steps=2"]


def osp(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """`osp <args>` in a subprocess (one thread, offline), output captured."""
    return subprocess.run([sys.executable, "-m", "osp", *args], cwd=REPO, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def train_args(corpus: dict[str, str], runs_root: Path, *extra: str) -> list[str]:  # noqa: F811
    return ["train", *tiny_overrides(corpus, runs_root, *BASE, f"run_name={RUN}", *extra)]


def error_line(proc: subprocess.CompletedProcess, prefix: str = "osp train: error: ") -> str:
    """The one error line of a failed command; fails when the command crashed with a traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"expected a failure:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-5000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def snapshot(folder: Path, only: tuple[str, ...] | None = None) -> dict[str, str]:
    """sha256 of every file under `folder` (the .lock excepted: it names whoever holds the run); `only`: just
    these top-level entries (e.g. rundir.ARTEFACTS: checkpoints, summary.json, csv, export, tokenizer)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"
            and (only is None or p.relative_to(folder).parts[0] in only)}


def strict_json(path: Path) -> dict:
    """json.loads that refuses NaN and Infinity (which json.dumps writes by default, and JSON has not)."""
    def refuse(name: str) -> float:
        raise ValueError(f"{path}: {name} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory) -> Path:  # noqa: F811
    """One finished tiny run, shared read-only; tests that change it work on `run_copy`."""
    root = tmp_path_factory.mktemp("reliability_runs")
    proc = osp(*train_args(corpus, root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = root / RUN
    names = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert {"last.ckpt", "step0000002.ckpt", "step0000004.ckpt"} <= names
    summary = strict_json(run_dir / "summary.json")
    assert summary["status"] == "finished" and summary["steps"] == 4 and math.isfinite(summary["val_loss"])
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A private copy of the shared run, at <tmp_path>/runs/base (runs_root = its parent)."""
    target = tmp_path / "runs" / RUN
    shutil.copytree(trained, target)
    return target
