"""The end-of-run summary tells the outlier story: kurtosis as a multiple of the floor, a verdict, the A/B."""

from __future__ import annotations

import pytest

from osp.training.summary import HEAVY_OUTLIERS, OUTLIER_FREE, format_summary, outlier_story

BASE = {"run_name": "tiny-1", "run_dir": "/r/tiny-1", "steps": 300, "wall_seconds": 250.0, "tokens_seen": 10,
        "train_loss": 5.0, "val_loss": 5.4, "val_ppl": 221.4, "ln_vocab": 8.32, "d_model": 256,
        "checkpoint": None, "logs": "/r/tiny-1/csv/metrics.csv", "recipe": "tiny", "optimizer": "adamw",
        "norm": "rms", "emb_proj": False}


def test_heavy_outliers_of_the_adamw_demo_point_to_the_osp_arm():
    s = {**BASE, "kurtosis": 7.38, "kurtosis_floor": 0.106, "kurtosis_floor_ratio": 69.6, "max_abs": 3483.0}
    lines = outlier_story(s)
    assert lines[0].startswith("verdict        heavy outliers: kurtosis 69.6x the floor, max |h| 3483")
    assert lines[1] == ("A/B            the outlier-safe arm (Muon + SSNorm + EmbProj + FFN tail loss): "
                        "osp train recipe=osp_ffn_tail")
    assert lines[2].strip() == "then: osp report /r/tiny-1 /r/osp_ffn_tail-*"
    text = format_summary(s)
    assert "kurtosis       7.38 = 69.6x the Gaussian floor 0.106 at d=256" in text


def test_losses_print_three_decimals_so_the_arms_line_up():
    text = format_summary({**BASE, "train_loss": 3.8463, "val_loss": 4.40015})
    assert "train loss     3.846\n" in text and "val loss       4.400   (ln vocab = 8.32)" in text


def test_the_w4a4_line_names_its_preset():
    s = {**BASE, "ppl_w4a4": 216.18, "ppl_fp": 215.28, "quant_ratio": 1.0042, "quant_preset": "w4a4kv4"}
    assert "W4A4 ppl       216.18   (preset w4a4kv4; fp 215.28, ratio 1.004)" in format_summary(s)


@pytest.mark.parametrize("recipe", ["osp", "osp_ffn_tail"])
def test_an_outlier_free_osp_run_points_back_to_the_baseline(recipe):
    s = {**BASE, "recipe": recipe, "optimizer": "muon", "norm": "ss", "emb_proj": True, "run_dir": "/r/osp-1",
         "kurtosis": 0.09, "kurtosis_floor": 0.106, "kurtosis_floor_ratio": 0.85, "max_abs": 60.0}
    verdict, ab, then = outlier_story(s)
    assert "outlier-free" in verdict and f"{OUTLIER_FREE:g}x" in verdict
    assert ab.endswith("the AdamW baseline arm: osp train recipe=tiny")
    assert then.strip() == "then: osp report /r/osp-1 /r/tiny-*"


def test_thresholds_and_runs_outside_the_demo():
    between = (OUTLIER_FREE + HEAVY_OUTLIERS) / 2
    s = {**BASE, "recipe": "muon", "kurtosis_floor_ratio": between, "max_abs": 10.0}
    assert outlier_story(s) == [f"verdict        some outliers: kurtosis {between:.3g}x the floor"]  # no A/B
    assert outlier_story({**BASE}) == []  # no outlier measurement: nothing to say



def test_paths_inside_the_working_directory_print_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path.resolve() / "runs" / "tiny-1"
    s = {**BASE, "run_dir": str(run), "checkpoint": str(run / "checkpoints" / "last.ckpt"),
         "logs": str(run / "csv" / "metrics.csv"), "kurtosis": 7.38, "kurtosis_floor": 0.106,
         "kurtosis_floor_ratio": 69.6, "max_abs": 3483.0}
    text = format_summary(s)
    assert "checkpoint     runs/tiny-1/checkpoints/last.ckpt" in text
    assert "summary        runs/tiny-1/summary.json" in text
    assert "then: osp report runs/tiny-1 runs/osp_ffn_tail-*" in text
    assert str(tmp_path.resolve()) not in text
    # outside it they stay absolute (the /r/... paths of BASE)
    assert "logs           /r/tiny-1/csv/metrics.csv" in format_summary(BASE)
