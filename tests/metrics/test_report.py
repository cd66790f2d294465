"""`osp report` on fake run directories: table, PNGs, errors."""

import csv
import json
from pathlib import Path

import pytest

from osp.cli import report as report_cli
from osp.metrics import report

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, kurtosis: list[float], summary: dict | None) -> Path:
    """A run dir as osp train leaves it: summary.json and a sparse Lightning CSVLogger metrics.csv."""
    run = root / name
    (run / "csv").mkdir(parents=True)
    if summary is not None:
        (run / "summary.json").write_text(json.dumps({"run_name": name, **summary}))
    keys = ["epoch", "step", "train/loss", "val/ppl", "outliers/kurtosis_mean",
            "outliers/kurtosis_exact_mean", "outliers/kurtosis_floor", "outliers/max_abs_max",
            "quant/ppl_w4a4"]
    with (run / "csv" / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for i, value in enumerate(kurtosis):
            step = 100 * i
            writer.writerow({"epoch": 0, "step": step, "train/loss": 5.0 - i})
            writer.writerow({"epoch": 0, "step": step, "outliers/kurtosis_mean": value,
                             "outliers/kurtosis_exact_mean": value * 0.9, "outliers/kurtosis_floor": 0.106,
                             "outliers/max_abs_max": 10.0 * (1 + value)})
        writer.writerow({"epoch": 0, "step": step, "val/ppl": 44.5 + len(name), "quant/ppl_w4a4": 47.25})
    return run


def test_report_compares_two_runs(tmp_path, capsys):
    adamw = make_run(tmp_path, "adamw", [0.1, 1.5, 3.25], {"steps": 200, "val_ppl": 52.2, "ppl_w4a4": 55.3,
                                                            "kurtosis": 3.25, "kurtosis_exact": 2.67,
                                                            "kurtosis_floor": 0.106, "max_abs": 117.0})
    osp_run = make_run(tmp_path, "osp", [0.1, 0.09, 0.09], None)  # still running: no summary yet
    out = tmp_path / "report"
    assert report_cli.main([str(adamw), str(osp_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = printed.splitlines()[0]
    for column in ("run", "val ppl", "W4A4 ppl", "kurt mean", "kurt exact", "max|h|"):
        assert column in header
    adamw_row = next(line for line in printed.splitlines() if line.startswith("adamw"))
    osp_row = next(line for line in printed.splitlines() if line.startswith("osp "))
    # Summary values win for the finished run...
    for cell in ("200", "52.20", "55.30", "3.25", "2.67", "117"):
        assert cell in adamw_row.split()
    # ...and the last logged CSV values fill in for the run without a summary.
    for cell in ("200", "47.50", "47.25", "0.09", "0.081", "10.9"):
        assert cell in osp_row.split()
    for name in ("kurtosis_mean.png", "max_abs.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert "| adamw" in (out / "comparison.md").read_text()


def test_report_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report_cli.main([str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert "no such run directory" in capsys.readouterr().err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit):
        report_cli.main([str(foreign)])
    assert "not an osp run directory" in capsys.readouterr().err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    with pytest.raises(report.RunDirError, match="not valid JSON"):
        report.load_run(broken)


def test_report_without_curves_writes_table_only(tmp_path, capsys):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"steps": 10, "val_ppl": 80.0}))
    out = tmp_path / "out"
    report_cli.main([str(run), "--out", str(out)])
    assert "80.00" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["comparison.md"]
