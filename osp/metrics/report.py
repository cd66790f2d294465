"""`osp report RUN_DIR [RUN_DIR ...] [--out DIR]`: compare finished (or running) osp runs.

Reads each run's `summary.json` (end-of-run summary) and `csv/metrics.csv` (Lightning CSVLogger:
a `step` column plus one column per metric, rows sparse), prints a table of final numbers and
writes comparison plots (kurtosis mean and max|h| against step) and the table to --out.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from osp.atomic import write_text
from osp.errors import RunDirError
from osp.tables import format_rows

__all__ = ["RunDirError", "Run", "load_run", "format_table", "write_report", "check_unique_names"]

# Column label, format, then where to find the value: summary.json keys first (the final numbers),
# then metrics.csv keys (last logged value), so a run that is still going can be compared too.
COLUMNS: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("steps", "d", ("steps",), ("step",)),
    ("val ppl", ".2f", ("val_ppl",), ("val/ppl",)),
    ("W4A4 ppl", ".2f", ("ppl_w4a4",), ("quant/ppl_w4a4",)),
    ("W4A4/fp", ".3f", ("quant_ratio",), ("quant/ratio",)),
    ("kurt mean", ".3g", ("kurtosis",), ("outliers/kurtosis_mean",)),
    ("kurt exact", ".3g", ("kurtosis_exact",), ("outliers/kurtosis_exact_mean",)),
    ("kurt max", ".3g", ("kurtosis_max",), ("outliers/kurtosis_max",)),
    ("floor", ".3f", ("kurtosis_floor",), ("outliers/kurtosis_floor",)),
    ("max|h|", ".4g", ("max_abs",), ("outliers/max_abs_max",)),
    ("down max/med", ".3g", ("down_proj_max_median",), ("outliers/down_proj_max_median_mean",)),
    ("down kurt", ".3g", ("down_proj_kurtosis",), ("outliers/down_proj_kurtosis_mean",)),
    ("top-8 share", ".2f", ("down_proj_channel_share",), ("outliers/down_proj_channel_share_mean",)),
    ("gate/up align", ".2f", ("gate_up_alignment",), ("outliers/gate_up_alignment_mean",)),
)
MISSING = "-"


@dataclass
class Run:
    """One run directory: its summary and every logged metric as (step, value) pairs."""

    name: str
    path: Path
    summary: dict = field(default_factory=dict)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        points = self.series.get(key, [])
        return [s for s, _ in points], [v for _, v in points]

    def value(self, summary_keys: Sequence[str], csv_keys: Sequence[str]) -> float | None:
        """Final value: the first summary key present, else the last logged value of a CSV key."""
        for key in summary_keys:
            value = self.summary.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
        for key in csv_keys:
            if key == "step" and self.series:
                return float(max(s for points in self.series.values() for s, _ in points))
            if self.series.get(key):
                return self.series[key][-1][1]
        return None


def _read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise RunDirError(f"{path} has no 'step' column; expected a Lightning CSVLogger metrics.csv")
        for row in reader:
            try:
                step = int(float(row["step"]))
            except (TypeError, ValueError):
                continue
            for key, text in row.items():
                if key in ("step", "epoch") or key is None or text in (None, ""):
                    continue
                try:
                    series.setdefault(key, []).append((step, float(text)))
                except ValueError:
                    continue
    for points in series.values():
        points.sort(key=lambda point: point[0])  # stable: rows of one step keep their order
    return series


def load_run(path: Path | str) -> Run:
    """Read a run directory; RunDirError names what is missing."""
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"{path}: no such run directory")
    if not path.is_dir():
        raise RunDirError(f"{path}: not a directory (give a run directory, e.g. runs/<run_name>)")
    summary_path, csv_path = path / "summary.json", path / "csv" / "metrics.csv"
    if not summary_path.is_file() and not csv_path.is_file():
        raise RunDirError(
            f"{path}: not an osp run directory (neither summary.json nor csv/metrics.csv in it)"
        )
    summary: dict = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as error:
            raise RunDirError(f"{summary_path}: not valid JSON ({error})") from error
        if not isinstance(summary, dict):
            raise RunDirError(f"{summary_path}: expected a JSON object")
    series = _read_metrics_csv(csv_path) if csv_path.is_file() else {}
    name = str(summary.get("run_name") or path.resolve().name)
    return Run(name=name, path=path, summary=summary, series=series)


def check_unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
    for run in runs:
        if seen[run.name] > 1:
            run.name = str(run.path)


def _cell(value: float | None, spec: str) -> str:
    if value is None:
        return MISSING
    return format(int(value), spec) if spec == "d" else format(value, spec)


def table_rows(runs: Sequence[Run]) -> list[list[str]]:
    """Header plus one row of formatted cells per run."""
    rows = [["run", *(label for label, *_ in COLUMNS)]]
    for run in runs:
        rows.append([run.name, *(_cell(run.value(s, c), spec) for _, spec, s, c in COLUMNS)])
    return rows


def format_table(runs: Sequence[Run], markdown: bool = False) -> str:
    """The comparison table as aligned text (or a Markdown table)."""
    return format_rows(table_rows(runs), markdown)


def write_report(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """Write comparison.md and, for runs with logged curves, the comparison plots; returns the paths."""
    from osp.metrics.plots import run_curves

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "comparison.md"
    write_text(table, format_table(runs, markdown=True) + "\n")
    written = [table]
    kurtosis = {run.name: run.curve("outliers/kurtosis_mean") for run in runs
                if run.series.get("outliers/kurtosis_mean")}
    if kurtosis:
        exact = {run.name: run.curve("outliers/kurtosis_exact_mean") for run in runs}
        floors = {run.value(("kurtosis_floor",), ("outliers/kurtosis_floor",)) for run in runs}
        lines = {f"Gaussian floor {floor:.3f}": floor for floor in sorted(f for f in floors if f is not None)}
        written.append(run_curves(kurtosis, out_dir / "kurtosis_mean.png",
                                  ylabel="OSP kurtosis (mean over taps)",
                                  title="Kurtosis vs step (solid: context, dashed: osp_exact)",
                                  dashed=exact, hlines=lines))
    peaks = {run.name: run.curve("outliers/max_abs_max") for run in runs
             if run.series.get("outliers/max_abs_max")}
    if peaks:
        written.append(run_curves(peaks, out_dir / "max_abs.png", ylabel="max |h| (over taps)",
                                  title="max |h| vs step"))
    down = {run.name: run.curve("outliers/down_proj_max_median_mean") for run in runs
            if run.series.get("outliers/down_proj_max_median_mean")}
    if down:
        written.append(run_curves(down, out_dir / "down_proj_max_median.png",
                                  ylabel="down_proj input max/median (mean over layers)",
                                  title="SwiGLU output max/median vs step"))
    return written
