"""Resuming a run: changed settings, shapes and data are refused in one line; allowed changes, a killed
checkpoint write and a new checkpoint interval resume from the last good checkpoint."""

from __future__ import annotations

import shutil

import pytest
import torch

from osp.checkpoint_files import checkpoint_step
from osp.export import load_model
from osp.training.rundir import ARTEFACTS
from tests.support.cli import RUN, error_line, osp, snapshot, strict_json, train_args
from tests.support.training import tiny_overrides

pytestmark = pytest.mark.slow


def test_changed_config_lists_every_difference_and_names_resume_allow(corpus, run_copy):
    before = snapshot(run_copy)
    proc = osp(*train_args(corpus, run_copy.parent, "resume=auto", "trainer.max_steps=7", "optim=muon",
                           "model.rope_theta=500.0"))
    line = error_line(proc)
    assert "this run differs from the checkpoint's" in line
    assert "model.rope_theta: 10000.0 -> 500.0" in line and "optim.name: 'adamw' -> 'muon'" in line
    assert "resume_allow=[" in line and "model.rope_theta" in line.split("resume_allow=[")[1]
    assert snapshot(run_copy) == before


def test_resume_allow_accepts_the_named_change(corpus, run_copy):
    proc = osp(*train_args(corpus, run_copy.parent, "resume=auto", "optim.lr=1e-3", "trainer.max_steps=7",
                           "resume_allow=[optim.lr,trainer.max_steps]"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume accepts optim.lr: 0.003 -> 0.001 (resume_allow)" in proc.stdout
    assert f"resuming from {run_copy / 'checkpoints' / 'last.ckpt'} (step 5)" in proc.stdout
    assert strict_json(run_copy / "summary.json")["status"] == "finished"


def test_an_accepted_optimizer_change_takes_effect(corpus, run_copy):
    """torch restores the saved hyperparameters with the optimizer state; the accepted ones must win."""
    proc = osp(*train_args(corpus, run_copy.parent, "resume=auto", "trainer.max_steps=6", "optim.lr=1e-3",
                           "optim.weight_decay=0.05",
                           "resume_allow=[optim.lr,optim.weight_decay,trainer.max_steps]"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = torch.load(run_copy / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 6
    groups = {g["name"]: g for g in checkpoint["optimizer_states"][0]["param_groups"]}
    assert {g["initial_lr"] for g in groups.values()} == {1e-3}
    assert groups["matrix"]["weight_decay"] == 0.05 and groups["gain"]["weight_decay"] == 0.0
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == [1e-3] * len(groups)


def test_changed_shape_is_one_line_not_a_size_mismatch_traceback(corpus, run_copy):
    """Accepted by resume_allow, the new shape is refused before anything is written (the weights are
    checked against the model built on the meta device): every file of the run stays as it was."""
    before = snapshot(run_copy)
    proc = osp(*train_args(corpus, run_copy.parent, "resume=auto", "model.d_model=32", "trainer.max_steps=7",
                           "resume_allow=[model,trainer.max_steps]"))
    line = error_line(proc)
    assert "the checkpoint does not fit this model" in line and "size mismatch" in line
    assert "model settings it was trained with" in line
    assert snapshot(run_copy) == before


def test_appended_training_text_refuses_resume_and_keeps_the_run_tokenizer(corpus, tmp_path):
    folder = tmp_path / "corpus"
    shutil.copytree(corpus["paths"].rsplit("/", 1)[0], folder)
    data = {"paths": str(folder / "*.txt"), "cache": corpus["cache"]}
    args = ["train", *tiny_overrides(data, tmp_path / "runs", "trainer.max_steps=4", "run_name=data",
                                     "~callbacks.export", "~callbacks.quant_eval", "~callbacks.outliers")]
    assert osp(*args).returncode == 0
    run_dir = tmp_path / "runs" / "data"
    # .hydra/ is rewritten (it records resume=auto); the artefacts must not be
    tokenizer, before = snapshot(run_dir / "tokenizer"), snapshot(run_dir, ARTEFACTS)
    with open(folder / "doc000.txt", "a") as handle:
        handle.write("\nthe cat sat on the mat. " * 20)
    line = error_line(osp(*args, "resume=auto", "trainer.max_steps=6", "resume_allow=[trainer.max_steps]"))
    assert "data: 'the data the run started with' -> 'changed files or dataset'" in line
    assert "resume_allow=[data]" in line and f"data.tokenizer={run_dir / 'tokenizer'}" in line
    assert snapshot(run_dir / "tokenizer") == tokenizer and snapshot(run_dir, ARTEFACTS) == before


def test_kill_9_during_a_checkpoint_write_resumes_from_the_last_good_one(corpus, run_copy):
    """A real SIGKILL while torch.save writes step0000006.ckpt.tmp; resume=auto removes it."""
    more = ["resume=auto", "trainer.max_steps=8", "resume_allow=[trainer.max_steps]"]
    killed = osp(*train_args(corpus, run_copy.parent, *more,
                             "+callbacks.fail._target_=tests.support.callbacks.FailSaveAt",
                             "+callbacks.fail.step=6", "+callbacks.fail.fault=kill"))
    assert killed.returncode == -9, killed.stderr[-3000:]
    checkpoints = run_copy / "checkpoints"
    assert (checkpoints / "step0000006.ckpt.tmp").exists() and not (checkpoints / "step0000006.ckpt").exists()
    good = {name: snapshot(checkpoints)[name] for name in ("step0000002.ckpt", "step0000004.ckpt")}
    proc = osp(*train_args(corpus, run_copy.parent, *more))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "osp: removed step0000006.ckpt.tmp" in proc.stdout and "interrupted" in proc.stdout
    assert "(step 5)" in proc.stdout  # resumed from the last complete checkpoint (the end of the first run)
    assert not list(checkpoints.glob("*.tmp"))
    assert checkpoint_step(checkpoints / "last.ckpt") == 8
    assert {name: snapshot(checkpoints)[name] for name in good} == good


def test_new_checkpoint_interval_keeps_last_ckpt_the_newest(corpus, run_copy):
    proc = osp(*train_args(corpus, run_copy.parent, "resume=auto", "trainer.max_steps=6",
                           "resume_allow=[trainer.max_steps]", "callbacks.checkpoint.every_n_train_steps=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoints = run_copy / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt", "step0000006.ckpt"], names
    last = checkpoints / "last.ckpt"
    assert checkpoint_step(last) == 6
    summary = strict_json(run_copy / "summary.json")
    assert summary["checkpoint"] == str(last.resolve()) and summary["steps"] == 6
    exported, _ = load_model(run_copy / "export")
    trained, _ = load_model(last)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name


@pytest.fixture(params=["truncated", "random"])
def damaged(request, trained, tmp_path):
    path = tmp_path / f"{request.param}.ckpt"
    data = (trained / "checkpoints" / "last.ckpt").read_bytes()
    noise = torch.randint(0, 256, (50_000,), dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(data[: len(data) // 2] if request.param == "truncated" else noise)
    return path


@pytest.mark.parametrize("command", ["train", "export", "eval"])
def test_damaged_checkpoint_is_one_line_naming_the_file(corpus, damaged, command, tmp_path):
    if command == "train":
        proc = osp(*train_args(corpus, tmp_path / "runs", f"resume={damaged}"))
    elif command == "export":
        proc = osp("export", str(damaged), str(tmp_path / "out"))
    else:
        proc = osp("eval", str(damaged))
    line = error_line(proc, f"osp {command}: error: ")
    assert str(damaged) in line and "truncated" in line and "PyTorch checkpoint" in line
    assert "mmap" not in line and "zipfile" not in line
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "runs" / RUN / "checkpoints").exists()
