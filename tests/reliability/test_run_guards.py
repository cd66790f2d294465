"""No command writes over a run: a finished run started again, outputs aimed into a run, a resume from an
older checkpoint, Hydra's own flags, run names that escape runs_root, an export with another run's tokenizer.
And the remaining one-line faults: each leaves every file of the run as it was."""

from __future__ import annotations

import shutil

import pytest

from osp.checkpoint_files import checkpoint_step
from tests.support.cli import RUN, error_line, osp, snapshot, strict_json, train_args

pytestmark = pytest.mark.slow


def test_a_finished_run_started_again_says_so_and_changes_nothing(corpus, run_copy):
    before = snapshot(run_copy)
    proc = osp(*train_args(corpus, run_copy.parent, "resume=auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run {run_copy} finished at step 5" in proc.stderr and "nothing changed" in proc.stderr
    assert "Traceback" not in proc.stderr and snapshot(run_copy) == before


def test_a_finished_run_given_more_steps_continues_and_writes_a_complete_summary(corpus, run_copy):
    proc = osp(*train_args(corpus, run_copy.parent, "resume=auto", "trainer.max_steps=7",
                           "resume_allow=[trainer.max_steps]"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = strict_json(run_copy / "summary.json")
    assert summary["status"] == "finished" and summary["steps"] == 7
    assert all(summary[key] is not None for key in ("train_loss", "val_loss", "ppl_w4a4", "export_dir"))
    assert checkpoint_step(run_copy / "checkpoints" / "last.ckpt") == 7


def test_resuming_an_older_checkpoint_of_the_run_is_refused_and_branching_works(corpus, run_copy):
    before = snapshot(run_copy)
    older = run_copy / "checkpoints" / "step0000002.ckpt"
    proc = osp(*train_args(corpus, run_copy.parent, f"resume={older}"))
    line = error_line(proc)
    assert ("is step 2 of this run, which has checkpoints up to step 5" in line
            and "run_name=<new name>" in line)
    assert snapshot(run_copy) == before
    # The branch: a new run that starts from the older checkpoint, beside the untouched original.
    args = [a for a in train_args(corpus, run_copy.parent, f"resume={older}")
            if not a.startswith("run_name=")]
    branched = osp(*args, "run_name=branch")
    assert branched.returncode == 0, branched.stderr[-3000:]
    assert (strict_json(run_copy.parent / "branch" / "summary.json")["steps"] == 5
            and snapshot(run_copy) == before)


@pytest.mark.parametrize("args, words", [
    (["-cn", "other"], "-cn is not an option of osp train"),
    (["--config-dir=/tmp"], "--config-dir is not an option of osp train"),
    (["hydra.run.dir=/tmp/elsewhere"], "hydra.run.dir is where osp keeps the run's record"),
    (["run_name=../escaped"], "run_name='../escaped' is not a name for a folder under runs_root"),
    (["run_name="], "run_name='' is not a name"),
    ([f"run_name={RUN}/checkpoints"], "lies inside the run"),
])
def test_flags_and_names_that_would_write_outside_the_run_dir_checks_are_refused(corpus, run_copy, args,
                                                                                 words):
    before = snapshot(run_copy.parent)
    proc = osp(*train_args(corpus, run_copy.parent), *args)
    assert words in error_line(proc)
    assert snapshot(run_copy.parent) == before and not (run_copy.parent.parent / "escaped").exists()


def test_outputs_aimed_into_a_run_are_refused(trained, tmp_path):
    before = snapshot(trained)
    proc = osp("eval", str(trained), "--quant", "w4a4kv4", "--json", str(trained / "summary.json"))
    assert "is inside the run dir" in error_line(proc, "osp eval: error: ")
    proc = osp("report", str(trained), "--out", str(trained / "csv"))
    assert (proc.returncode == 2 and "is (inside) the run dir" in proc.stderr
            and "Traceback" not in proc.stderr)
    (tmp_path / "a-file").write_text("mine")
    proc = osp("report", str(trained), "--out", str(tmp_path / "a-file"))
    assert proc.returncode == 2 and "is a file" in proc.stderr and (tmp_path / "a-file").read_text() == "mine"
    for target in (trained / "tokenizer", trained / "export", trained):
        proc = osp("export", str(trained), str(target), "--force")
        assert f"is in the run dir {trained}" in error_line(proc, "osp export: error: ")
    proc = osp("export", str(trained), str(trained / "export"), "--format", "gguf", "--force")
    assert f"is in the run dir {trained}" in error_line(proc, "osp export: error: ")
    assert snapshot(trained) == before


def test_force_replaces_only_an_earlier_export_not_a_folder_of_export_named_files(trained, tmp_path):
    """A tokenizer folder copied elsewhere holds only export-named files: still not an export to replace."""
    from osp.errors import OutputExistsError
    from osp.export import export_hf, load_model

    folder = tmp_path / "tokenizer-copy"
    shutil.copytree(trained / "tokenizer", folder)
    before = snapshot(folder)
    model, _ = load_model(trained)
    with pytest.raises(OutputExistsError, match="is not an earlier export \\(no config.json\\)"):
        export_hf(model, folder, force=True)
    assert snapshot(folder) == before


def test_an_export_refuses_a_tokenizer_of_another_size(trained, tmp_path):
    """Another tokenizer, smaller or larger than the model's 384 ids: refused in both directions (the model's
    vocabulary may only be the tokenizer's padded to a multiple of 64 or 128)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from osp.data.tokenizer import save_tokenizer, train_bpe
    from tests.support.synthetic_text import synthetic_documents

    before = snapshot(trained)
    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(100)}, unk_token="w0"))
    tokenizers = {"100": PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0"),
                  "512": train_bpe(synthetic_documents(400, seed=1), vocab_size=512)}
    for name, tokenizer in tokenizers.items():
        other = tmp_path / f"vocab{name}"
        save_tokenizer(tokenizer, other, model_max_length=64)
        vocab = len(tokenizer)  # a BPE may learn fewer merges than asked
        for fmt in ("hf", "gguf"):
            out = tmp_path / f"export-{name}-{fmt}"
            proc = osp("export", str(trained), str(out), "--format", fmt, "--tokenizer", str(other))
            line = error_line(proc, "osp export: error: ")
            assert f"the tokenizer has {vocab} tokens but the model's vocab_size is 384" in line
            assert not out.exists()
    assert snapshot(trained) == before


@pytest.mark.parametrize("args, words", [
    (["--seq-len", "4096"], "--seq-len 4096 exceeds the model's context (max_seq_len 64)"),
    (["--device", "cuda"], "--device cuda: this machine has no usable CUDA GPU"),
    (["--device", "tpu9"], "--device tpu9:"),
])
def test_eval_settings_the_model_or_machine_cannot_take_are_one_line(trained, args, words):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert words in error_line(osp("eval", str(trained), "--quant", "w4a4kv4", *args), "osp eval: error: ")


def test_eval_refuses_an_unknown_precision_and_uses_the_given_tokenizer(trained, tmp_path):
    proc = osp("eval", str(trained), "--precision", "fp17")
    assert proc.returncode == 2 and "invalid choice: 'fp17'" in proc.stderr and "Traceback" not in proc.stderr
    missing = osp("eval", str(trained), "--quant", "w4a4kv4", "--tokenizer", str(tmp_path / "nope"))
    assert "nope" in error_line(missing, "osp eval: error: ")  # read, not ignored


def test_a_changed_depth_under_resume_allow_model_is_one_line(corpus, run_copy):
    before = snapshot(run_copy)
    proc = osp(*train_args(corpus, run_copy.parent, "resume=auto", "model.n_layers=3", "resume_allow=[model]",
                           "trainer.max_steps=7", "resume_allow=[model,trainer.max_steps]"))
    line = error_line(proc)
    assert "the checkpoint does not fit this model" in line and "model.layers.2" in line
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("args, words", [
    (["--gpus-per-node", "0"], "must be a positive integer"),
    (["trainer.devices=-2"], "trainer.devices=-2 must be a positive integer"),
    (["data.batch_size=0"], "data.batch_size=0 must be a positive integer"),
])
def test_plan_refuses_counts_below_one(args, words):
    proc = osp("plan", *args)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr


def test_a_cache_or_output_that_is_a_file_is_one_line(tmp_path, trained):
    cache = tmp_path / "cache-file"
    cache.write_text("not a folder")
    proc = osp("data", "info", OSP_CACHE_DIR=str(cache))
    assert "is a file" in proc.stderr and proc.returncode == 1 and "Traceback" not in proc.stderr
    proc = osp("data", "prepare", "--source", "files", f"source.paths={trained}/*.nothing",
               OSP_CACHE_DIR=str(cache))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_sigterm_during_the_final_export_is_a_stop_and_the_rerun_finishes(corpus, tmp_path):
    """The signal lands while the Export callback writes at the end of training: not rc 0, but a stop with
    last.ckpt at the final step; resume=auto then does only the end-of-training work."""
    args = train_args(corpus, tmp_path, "+callbacks.kill._target_=tests.support.callbacks.SignalAtTrainEnd")
    proc = osp(*args)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "stopped by SIGTERM after step 5" in proc.stderr and "Traceback" not in proc.stderr
    run = tmp_path / RUN
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 5
    assert strict_json(run / "summary.json")["status"] == "stopped"
    resumed = osp(*train_args(corpus, tmp_path, "resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert strict_json(run / "summary.json")["status"] == "finished"
    assert (run / "export" / "config.json").is_file()
