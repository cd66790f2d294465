"""`osp bench protocols RUN [RUN ...]`: the quantized/full-precision perplexity ratio of trained runs (or of
their checkpoints) under the quantization protocols deployments use, side by side.

    osp train && osp train recipe=osp_ffn_tail                     # the A/B arms
    osp bench protocols runs/tiny-* runs/osp_ffn_tail-*             # one row per run, one column per preset

Protocols (presets of `osp.quant.QuantConfig`, any other preset string works too):

- w4a4kv4: OSP's RTN 4-4-4 (per-token dynamic 4-bit inputs); +had: with the down-projection Hadamard (an
  online rotation at inference); +smooth: with SmoothQuant per-channel scales on the down_proj and norm-fed
  inputs, calibrated offline and folded into the weights (free at inference, `osp export --smooth`);
- w8a8: INT8 weights per channel and per-token dynamic INT8 inputs;
- w8a8+static, w4a8+static, w4a4kv4+static: one symmetric scale per linear input, calibrated offline as the
  max |x| over training blocks (SmoothQuant's or TensorRT's static INT8 without smoothing). One outlier
  channel sets the scale of the whole tensor, so this is where outliers cost the most; +had+static: with the
  down-projection Hadamard, which spreads the SwiGLU output's heavy tail before its static scale is taken.

Every run is evaluated on its own held-out blocks and calibrated on its own training blocks (`osp eval`'s
data), so the rows differ only in the model. Prints a table (`--markdown` for the README) with each run's
kurtosis and max|h| from its summary, and writes `--json`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from osp.arguments import positive_int
from osp.atomic import write_json
from osp.runs import check_output_file
from osp.tables import format_rows

DEFAULT_PRESETS = ("w4a4kv4", "w4a4kv4+had", "w4a4kv4+smooth", "w8a8", "w8a8+static", "w4a8+static",
                   "w4a4kv4+static", "w4a4kv4+smooth+static", "w4a4kv4+had+static")


@dataclass
class LoadedRun:
    """A run (or one of its checkpoints) as the protocols evaluate it: the model on CPU, its own held-out
    blocks (N, T+1), its training blocks for calibration (None when no preset calibrates), and its
    precision."""

    path: Path
    name: str
    model: torch.nn.Module
    held: torch.Tensor
    calib: torch.Tensor | None
    precision: str
    summary: dict[str, Any]


def load_run(run_dir: Path, presets: list[str], blocks: int, calib_blocks: int) -> LoadedRun:
    """Load a run dir or checkpoint with `osp eval`'s data: `blocks` held-out blocks, and `calib_blocks`
    training blocks when one of `presets` calibrates."""
    from osp.export import load_model
    from osp.quant.evaluation import eval_config
    from osp.runs import build_pipeline, find_tokenizer_dir, run_precision

    model, _ = load_model(run_dir, device="cpu")  # its last checkpoint, or its export when it kept none
    data = build_pipeline(run_dir, None, find_tokenizer_dir(run_dir), None)
    held = data.heldout_blocks(blocks)
    calib = (data.train_blocks(calib_blocks) if any(eval_config(p).needs_calibration for p in presets)
             else None)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    # A checkpoint of a run (runs/x/checkpoints/step0000500.ckpt) is named for both: x/step0000500.
    name = f"{run_dir.parent.parent.name}/{run_dir.stem}" if run_dir.suffix == ".ckpt" else run_dir.name
    return LoadedRun(run_dir, name, model, held, calib, run_precision(run_dir, None, "cpu"), summary)


def protocol_ratios(run: LoadedRun, presets: list[str], batch_size: int) -> dict[str, Any]:
    """Quantized / full-precision perplexity of a loaded run under each preset."""
    from osp.precision import autocast_for
    from osp.quant.evaluation import evaluate_quant

    out: dict[str, Any] = {"run": str(run.path), "name": run.name,
                           "kurtosis": run.summary.get("kurtosis_exact"),
                           "max_abs": run.summary.get("max_abs"), "ratios": {}}
    with autocast_for(run.precision, "cpu"):
        for preset in presets:
            result = evaluate_quant(run.model, run.held, preset, calib_blocks=run.calib,
                                    batch_size=batch_size)
            out["ppl_fp"] = result["ppl_fp"]
            out["ratios"][result["preset"]] = result["ratio"]
            print(f"  {run.name}: {result['preset']} ppl {result['ppl_quant']:.2f} "
                  f"/ fp {result['ppl_fp']:.2f} = {result['ratio']:.4f}", flush=True)
    return out


def evaluate_run(run_dir: Path, presets: list[str], blocks: int, calib_blocks: int,
                 batch_size: int) -> dict[str, Any]:
    """One row of the table: a run's (or checkpoint's) ratio under each preset, with its summary's
    kurtosis."""
    return protocol_ratios(load_run(run_dir, presets, blocks, calib_blocks), presets, batch_size)


def format_table(results: list[dict[str, Any]], markdown: bool = False) -> str:
    presets = list(results[0]["ratios"])
    rows: list[list[object]] = [["run", "kurtosis", "max|h|", "ppl fp", *presets]]
    for r in results:
        kurt = "-" if r["kurtosis"] is None else f"{r['kurtosis']:.3g}"
        peak = "-" if r["max_abs"] is None else f"{r['max_abs']:.4g}"
        rows.append([r["name"], kurt, peak, f"{r['ppl_fp']:.2f}",
                     *(f"{r['ratios'][p]:.3f}" for p in presets)])
    return format_rows(rows, markdown=markdown)


def main(argv: list[str]) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="osp bench protocols", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+",
                        help="run dirs (runs/<name>: the last checkpoint, or the export), or "
                             "checkpoints of runs (runs/<name>/checkpoints/step0000500.ckpt)")
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS),
                        help="quant presets (columns)")
    parser.add_argument("--blocks", type=positive_int, default=16,
                        help="held-out blocks per evaluation (QuantEval's)")
    parser.add_argument("--calib-blocks", type=positive_int, default=32,
                        help="training blocks for static scales")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    from osp.errors import OspError, QuantConfigError
    from osp.quant.evaluation import eval_config

    try:
        for preset in args.presets:
            eval_config(preset)
    except QuantConfigError as err:
        raise SystemExit(f"osp bench protocols: --presets: {err}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.json:
        check_output_file(args.json, "--json")
    results = []
    for run in args.runs:
        run_dir = Path(run)
        try:
            results.append(evaluate_run(run_dir, args.presets, args.blocks, args.calib_blocks,
                                        args.batch_size))
        except OspError as err:
            message = str(err) if str(run_dir) in str(err) else f"{run_dir}: {err}"
            raise SystemExit(f"osp bench protocols: error: {message}") from None
    print(format_table(results, args.markdown))
    if args.json:
        write_json(args.json, results)
    return results
