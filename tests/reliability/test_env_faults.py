"""Environment faults: a diverging run past the skip limit, read-only folders and a full disk end in one
line; earlier checkpoints survive."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest

from osp.checkpoint_files import checkpoint_step
from tests.support.cli import error_line, osp, snapshot, train_args

pytestmark = pytest.mark.slow


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A folder nobody may create files in: chmod 0555, or for root (whom permissions do not stop) a
    folder under the read-only /sys of a container."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    probe = Path("/sys") / f"osp-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            yield Path("/sys")
            return
        raise
    probe.rmdir()
    pytest.skip("running as root on a writable /sys: no folder here refuses writes")


def test_skip_limit_stops_a_diverging_run_in_one_line(corpus, tmp_path):
    proc = osp(*train_args(corpus, tmp_path, "trainer.max_steps=20", "callbacks.stability.action=skip",
                           "+callbacks.poison._target_=tests.support.callbacks.PoisonGradient",
                           "+callbacks.poison.step=[1,2,3,4,5,6]"))
    line = error_line(proc)
    assert proc.returncode == 1
    assert "2 of 3 steps skipped for a non-finite loss or gradient" in line
    assert "callbacks.stability.max_skip_fraction=0.05" in line and "lower optim.lr" in line
    # saved before the skips, and intact
    assert checkpoint_step(tmp_path / "base" / "checkpoints" / "step0000002.ckpt") == 2


def test_read_only_runs_root_is_one_line(corpus, read_only_dir):
    runs_root = read_only_dir / "runs"
    proc = osp(*train_args(corpus, runs_root))
    line = error_line(proc)
    assert proc.returncode == 1
    assert f"cannot write {runs_root}" in line and "choose a writable runs_root=PATH" in line
    assert not runs_root.exists()


def test_read_only_export_target_is_one_line(trained, read_only_dir):
    before = snapshot(trained)
    target = read_only_dir / "export"
    proc = osp("export", str(trained), str(target))
    line = error_line(proc, "osp export: error: ")
    assert proc.returncode == 1
    assert str(read_only_dir) in line and "choose a writable OUT" in line
    assert "Permission denied" in line or "not permitted" in line or "read-only" in line
    assert not target.exists() and snapshot(trained) == before


def test_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_earlier_one(corpus, tmp_path):
    proc = osp(*train_args(corpus, tmp_path, "trainer.max_steps=6",
                           "+callbacks.fail._target_=tests.support.callbacks.FailSaveAt",
                           "+callbacks.fail.step=4"))
    line = error_line(proc)
    checkpoints = tmp_path / "base" / "checkpoints"
    assert proc.returncode == 1
    assert f"no space left on the device writing {checkpoints / 'step0000004.ckpt'}" in line
    assert "free space" in line and "resume=auto" in line and "earlier checkpoints are intact" in line
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step0000002.ckpt"]  # no .tmp left
    assert checkpoint_step(checkpoints / "step0000002.ckpt") == 2
    assert checkpoint_step(checkpoints / "last.ckpt") == 2
    assert (tmp_path / "base" / "csv" / "metrics.csv").is_file()
