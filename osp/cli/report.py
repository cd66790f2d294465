"""`osp report RUN_DIR [RUN_DIR ...]`: compare runs in a table and plots (osp.metrics.report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from osp.errors import OspError
from osp.metrics.report import check_unique_names, format_table, load_run, write_report
from osp.runs import check_output_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point of `osp report`."""
    parser = argparse.ArgumentParser(
        prog="osp report",
        description="Compare osp runs: final perplexity, W4A4 perplexity and outlier metrics, plus plots.",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (runs/<run_name>)")
    parser.add_argument("--out", type=Path, default=Path("osp_report"),
                        help="where to write comparison.md and the PNG plots (default: ./osp_report)")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(path) for path in args.runs]
        check_output_dir(args.out, "--out")
    except OspError as error:
        parser.error(str(error))
    check_unique_names(runs)
    print(format_table(runs))
    written = write_report(runs, args.out)
    if len(written) == 1:
        print("(no outlier curves in csv/metrics.csv of these runs: table only)")
    print("\nwritten: " + ", ".join(str(path) for path in written))
    return 0
