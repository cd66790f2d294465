"""A run dir belongs to one run: a rerun without resume and a second live run are refused, nothing is lost."""

from __future__ import annotations

import pytest

from osp.training.rundir import RunLock
from tests.support.cli import RUN, error_line, osp, snapshot, train_args

pytestmark = pytest.mark.slow


def test_same_run_name_without_resume_is_refused_and_the_first_run_is_untouched(corpus, run_copy):
    before = snapshot(run_copy)
    proc = osp(*train_args(corpus, run_copy.parent))
    line = error_line(proc)
    assert proc.returncode == 1
    assert f"{run_copy} already holds a run" in line and "checkpoints" in line
    assert f"run_name={RUN} resume=auto" in line and "another run_name" in line
    assert snapshot(run_copy) == before


def test_second_run_with_the_name_of_a_live_one_is_refused_by_the_lock(corpus, run_copy):
    before = snapshot(run_copy)
    with RunLock(run_copy):  # the first run, alive (this process holds its lock)
        proc = osp(*train_args(corpus, run_copy.parent, "resume=auto", "trainer.max_steps=7",
                               "resume_allow=[trainer.max_steps]"))
    line = error_line(proc)
    assert proc.returncode == 1
    assert f"run dir {run_copy} is in use by pid" in line and "another run_name" in line
    assert snapshot(run_copy) == before
