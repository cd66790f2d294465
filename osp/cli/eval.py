"""`osp eval MODEL`: perplexity, W4A4 perplexity and kurtosis of a checkpoint, run dir or HF folder.

The numbers come from the same functions the training callbacks use (osp.quant.evaluate_quant,
osp.metrics.evaluate_kurtosis) on the same held-out blocks, so an evaluation of a run's export
equals the last in-training values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from osp.arguments import positive_int
from osp.atomic import write_text
from osp.errors import ConfigError, DataError, OspError, one_line
from osp.precision import autocast_for
from osp.runs import build_pipeline, check_output_file, find_tokenizer_dir, run_precision

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osp eval", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a .ckpt file, a run dir, or an exported Hugging Face folder")
    p.add_argument("--kurtosis", action="store_true", help="only the outlier statistics")
    p.add_argument("--quant", metavar="PRESET", help="only perplexity: fp and PRESET (e.g. w4a4kv4, w4a16)")
    p.add_argument("--hadamard", action="store_true", help="online Hadamard on the down-projection input")
    p.add_argument("--gptq", action="store_true",
                   help="GPTQ weights (calibrated on training text) instead of RTN")
    p.add_argument("--quant-blocks", type=positive_int, default=16,
                   help="held-out blocks for perplexity (QuantEval default)")
    p.add_argument("--kurtosis-blocks", type=positive_int, default=8,
                   help="held-out blocks for kurtosis (OutlierMonitor default)")
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="blocks per forward pass (QuantEval default)")
    p.add_argument("--calib-blocks", type=positive_int, default=32,
                   help="training blocks for calibration (GPTQ weights, +static activation scales)")
    p.add_argument("--attribute", action="store_true",
                   help="also the cost of the preset at each site alone (every linear input and KV cache), "
                        "each layer and each kind of site")
    p.add_argument("--attribute-top", type=positive_int, default=10, help="sites to list with --attribute")
    p.add_argument("--feed", choices=("osp_exact", "context", "both"), default="both",
                   help="kurtosis: each token alone (osp_exact, as the OSP paper), in context, or both")
    p.add_argument("--data-config", help="a YAML with a `data` node (default: the run's .hydra/config.yaml)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's own)")
    p.add_argument("--seq-len", type=positive_int, help="override the evaluation sequence length")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="autocast as in training (default: the run's trainer.precision)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    from osp.errors import QuantConfigError
    from osp.quant.evaluation import eval_config

    if args.quant:  # a typo fails in a second, before the model and the data are loaded
        try:
            eval_config(args.quant, args.hadamard, args.gptq)
        except QuantConfigError as err:
            print(f"osp eval: error: --quant {args.quant}: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    try:
        results = evaluate(args)
    except OspError as err:
        print(f"osp eval: error: {one_line(str(err))}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.json:
        write_text(args.json, json.dumps(results, indent=2, default=str) + "\n")


def check_device(device: str) -> None:
    """--device names a device torch knows and this machine has."""
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ConfigError(f"--device {device}: {str(err).splitlines()[0]}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no usable CUDA GPU; use --device cpu")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """What `osp eval` prints (and writes with --json), after every setting was checked."""
    from osp.export import load_model

    check_device(args.device)
    if args.json:
        check_output_file(args.json, "--json")
    model_path = Path(args.model)
    model, _ = load_model(model_path, device=args.device, tokenizer=args.tokenizer)
    if args.seq_len is not None and args.seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"--seq-len {args.seq_len} exceeds the model's context (max_seq_len "
                          f"{model.cfg.max_seq_len}); use at most that")
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else find_tokenizer_dir(model_path)
    data = build_pipeline(model_path, args.data_config, tokenizer_dir, args.seq_len,
                          tokenizer=args.tokenizer)
    if data.vocab_size > model.cfg.vocab_size:
        raise DataError(f"the data's tokenizer has {data.vocab_size} ids but the model only "
                        f"{model.cfg.vocab_size}; pass the model's --tokenizer")
    do_quant = not args.kurtosis or bool(args.quant) or args.attribute
    do_kurtosis = not args.quant or args.kurtosis
    precision = args.precision or run_precision(model_path, args.data_config, args.device)
    results: dict[str, Any] = {"model": str(model_path), "precision": precision}
    with autocast_for(precision, args.device):
        _evaluate(args, model, data, do_quant, do_kurtosis, results)
    return results


def _evaluate(args: argparse.Namespace, model: torch.nn.Module, data: Any, do_quant: bool, do_kurtosis: bool,
              results: dict[str, Any]) -> None:
    from osp.metrics import evaluate_kurtosis, format_kurtosis
    from osp.quant.evaluation import eval_config, evaluate_quant

    if do_quant:
        blocks = data.heldout_blocks(args.quant_blocks).to(args.device)
        cfg = eval_config(args.quant or "w4a4kv4", args.hadamard, args.gptq)
        calib = data.train_blocks(args.calib_blocks).to(args.device) if cfg.needs_calibration else None
        q = evaluate_quant(model, blocks, cfg, calib_blocks=calib, batch_size=args.batch_size)
        results["quant"] = q
        print(f"perplexity on {q['tokens']:,} held-out tokens: fp {q['ppl_fp']:.4f}   "
              f"{q['preset']} {q['ppl_quant']:.4f}   ratio {q['ratio']:.4f}")
        if args.attribute:
            from osp.quant.attribution import attribute, format_attribution

            results["attribution"] = attribute(model, blocks, cfg, calib_blocks=calib,
                                               batch_size=args.batch_size)
            print(format_attribution(results["attribution"], top=args.attribute_top))
    if do_kurtosis:
        ids = data.heldout_blocks(args.kurtosis_blocks)[:, :-1].to(args.device)
        feeds = ("context", "osp_exact") if args.feed == "both" else (args.feed,)
        for feed in feeds:
            k = evaluate_kurtosis(model, ids, feed)
            results[f"kurtosis_{feed}"] = k
            print(format_kurtosis(k))
