"""`osp bench protocols`: quantized/fp perplexity of trained runs under several protocols, side by side."""

from __future__ import annotations

import json
import shutil

import pytest
from omegaconf import OmegaConf

from osp.bench import protocols
from osp.conf import compose
from osp.export import load_model
from osp.quant import perplexity
from osp.runs import build_pipeline
from osp.training.run import train
from tests.support.training import tiny_overrides

pytestmark = pytest.mark.slow


def test_protocol_table_of_a_trained_run(corpus, tmp_path, one_thread):
    cfg = compose(tiny_overrides(corpus, tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=4",
                                 "run_name=arm"))
    train(cfg)
    run = tmp_path / "arm"
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # what `osp train` writes (Hydra does, not train())
    out = tmp_path / "protocols.json"
    results = protocols.main([str(run), "--presets", "w4a4kv4", "w8a8+static", "--blocks", "3",
                              "--calib-blocks", "2", "--batch-size", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    (row,) = results
    assert list(row["ratios"]) == ["w4a4kv4", "w8a8+static"] and row["kurtosis"] is not None
    # Independently: the same model, blocks and calibration through osp.quant.perplexity (the function).
    model, _ = load_model(run)
    data = build_pipeline(run, None, None, None)  # the run's own data config, as the bench reads it
    held, calib = data.heldout_blocks(3), data.train_blocks(2)
    fp = perplexity(model, held, batch_size=2)
    static = perplexity(model, held, quant="w8a8+static", calib_blocks=calib, batch_size=2)
    assert row["ratios"]["w8a8+static"] == pytest.approx(static / fp, rel=1e-6)
    assert row["ppl_fp"] == pytest.approx(fp, rel=1e-6)
    table = protocols.format_table(results, markdown=True)
    assert table.startswith("| run ") and "w8a8+static" in table and f"{static / fp:.3f}" in table
    # A checkpoint of the run (a token-budget curve reads one per row) is named for the run and the step.
    (at_step,) = protocols.main([str(run / "checkpoints" / "last.ckpt"), "--presets", "w8a8+static",
                                 "--blocks", "3", "--calib-blocks", "2", "--batch-size", "2"])
    assert (at_step["name"] == "arm/last"
            and at_step["ratios"]["w8a8+static"] == pytest.approx(static / fp, rel=1e-6))
    # A run that kept no checkpoints (the paper-table scales) is read from its export.
    shutil.rmtree(run / "checkpoints")
    (from_export,) = protocols.main([str(run), "--presets", "w4a4kv4", "w8a8+static", "--blocks", "3",
                                     "--calib-blocks", "2", "--batch-size", "2"])
    assert from_export["ratios"] == pytest.approx(row["ratios"], rel=1e-3)


def test_bad_input_is_one_line(tmp_path, capsys):
    """Counts of zero would divide by zero (no tokens) or calibrate on nothing (a silent garbage scale)."""
    from osp.bench import compile as compile_bench
    from osp.cli.eval import parse_args

    for run in (lambda: protocols.main([str(tmp_path), "--blocks", "0"]),
                lambda: parse_args(["model", "--calib-blocks", "0"]),
                lambda: parse_args(["model", "--attribute-top", "-1"]),
                lambda: compile_bench.main(["--batch-size", "x"])):
        with pytest.raises(SystemExit) as stop:
            run()
        assert stop.value.code == 2
        assert "must be a positive integer, got" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--presets: unknown quant preset 'w9x'"):
        protocols.main([str(tmp_path), "--presets", "w9x"])
    with pytest.raises(SystemExit,
                       match=r"error: .*: not a checkpoint, a run dir with checkpoints/, or an exported"):
        protocols.main([str(tmp_path)])
