"""`osp` subprocesses and what the fault tests check of them: one error line, untouched files, strict JSON."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from tests.support.training import subprocess_env, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
RUN = "base"
# The shared run: 5 steps, checkpoints at steps 2 and 4 and last.ckpt at the end (step 5: an interval that
# does not divide the run), metrics, summary, export.
BASE = ["trainer.max_steps=5", "trainer.val_check_interval=2", "callbacks.checkpoint.every_n_train_steps=2"]


def osp(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """`osp <args>` in a subprocess (one thread, offline), output captured."""
    return subprocess.run([sys.executable, "-m", "osp", *args], cwd=REPO, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def train_args(corpus: dict[str, str], runs_root: Path, *extra: str) -> list[str]:
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
