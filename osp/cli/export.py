"""`osp export CHECKPOINT OUT`: a training checkpoint (or run dir) -> a Hugging Face folder or a GGUF file."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from osp.arguments import positive_int
from osp.checkpoint_files import resolve_checkpoint, run_dir_of
from osp.errors import CheckpointError, OutputExistsError
from osp.export.gguf import OUTTYPES, export_gguf
from osp.export.hf import export_hf
from osp.export.layout import LayoutWarning
from osp.export.load import load_model
from osp.quant.config import DEFAULT_ALPHA
from osp.runs import run_of

DESCRIPTION = """Write a Hugging Face folder (config.json, generation_config.json, safetensors, tokenizer)
from an osp checkpoint. Models whose blocks all fold (RMSNorm/SSNorm, EmbProj) become a plain
LlamaForCausalLM; others ship their modeling code (load with trust_remote_code=True). With --format gguf,
write one llama.cpp GGUF file instead (foldable models only)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osp export", description=DESCRIPTION)
    parser.add_argument("checkpoint", help="a Lightning .ckpt, a run dir (its newest readable checkpoint), "
                                           "or an exported folder")
    parser.add_argument("out_dir", metavar="out",
                        help="hf: folder to write (must be empty or absent unless --force); gguf: the .gguf "
                             "file, or an existing folder that gets <run name>.gguf")
    parser.add_argument("--format", choices=("hf", "gguf"), default="hf",
                        help="hf: Hugging Face folder; gguf: llama.cpp file (default: %(default)s)")
    parser.add_argument("--outtype", choices=tuple(OUTTYPES),
                        help="gguf only: type of the 2-D weights (default: f16; norms stay f32)")
    parser.add_argument("--tokenizer",
                        help="tokenizer folder (default: <run_dir>/tokenizer, or the exported folder's own)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT folder or an existing "
                                                             "GGUF file (atomically)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="hf only: cast the weights (default: as trained)")
    parser.add_argument("--max-shard-size", default=None,
                        help="hf only: split weights into shards of at most this size (default: 5GB)")
    parser.add_argument("--smooth", nargs="?", type=float, const=DEFAULT_ALPHA, metavar="ALPHA",
                        help="fold SmoothQuant per-channel scales (the +smooth presets' calibration, "
                             f"migration strength ALPHA, default {DEFAULT_ALPHA}) into up_proj, the norm "
                             "gains and their readers: a model whose 4-bit activations lose less, at no cost "
                             "at inference")
    parser.add_argument("--calib-blocks", type=positive_int, default=32,
                        help="--smooth: training blocks of the run to calibrate on (default: %(default)s)")
    return parser


def run_name(checkpoint: str) -> str:
    """The name a GGUF file gets inside a folder: the run dir's (or the exported folder's) name."""
    path = Path(checkpoint).resolve()
    if path.is_dir() and (path / "config.json").is_file():
        return path.name
    try:
        return run_dir_of(resolve_checkpoint(path)).name or "model"
    except (OSError, CheckpointError):
        return path.stem or "model"


def calibrated_smoothing(args: argparse.Namespace, model: Any) -> list | None:
    """--smooth: the +smooth scales of the model, calibrated on its run's training blocks."""
    if args.smooth is None:
        return None
    from osp.quant import QuantConfig
    from osp.quant.w4a4 import smoothing_of
    from osp.runs import build_pipeline, find_tokenizer_dir

    cfg = QuantConfig.from_preset("w4a4kv4+smooth", smooth_alpha=args.smooth)
    data = build_pipeline(Path(args.checkpoint), None, find_tokenizer_dir(Path(args.checkpoint)), None)
    return smoothing_of(model, cfg, data.train_blocks(args.calib_blocks), batch_size=8)


def check_outside_runs(out: Path) -> None:
    """`osp export` never writes into a run dir (its export/ belongs to the run's training, its tokenizer/
    and checkpoints to the run): refuse a target that is one or lies in one."""
    run = run_of(out.resolve())  # run_of looks at the target's folders upwards
    if run is not None:
        raise OutputExistsError(f"{out} is in the run dir {run}, whose files belong to its run; "
                                "export beside the run (osp export RUN_DIR ../my-export)")


def _check_flags(args: argparse.Namespace) -> None:
    if args.smooth is not None and not 0.0 <= args.smooth <= 1.0:
        raise ValueError(f"--smooth {args.smooth}: the migration strength lies in [0, 1]")
    if args.format == "gguf" and (args.dtype or args.max_shard_size):
        raise ValueError("--dtype and --max-shard-size are for --format hf; GGUF takes --outtype")
    if args.format == "hf" and args.outtype:
        raise ValueError("--outtype is for --format gguf; the hf format takes --dtype")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _check_flags(args)
        check_outside_runs(Path(args.out_dir))
        model, tokenizer = load_model(args.checkpoint, tokenizer=args.tokenizer)
        smoothing = calibrated_smoothing(args, model)
        if tokenizer is None and args.format == "hf":
            print("osp export: no tokenizer found; writing the model only (pass --tokenizer PATH)",
                  file=sys.stderr)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LayoutWarning)
            if args.format == "gguf":
                out = export_gguf(model, args.out_dir, tokenizer, outtype=args.outtype or "f16",
                                  force=args.force, name=run_name(args.checkpoint), smoothing=smoothing)
            else:
                out = export_hf(model, args.out_dir, tokenizer=tokenizer, force=args.force,
                                max_shard_size=args.max_shard_size or "5GB", dtype=args.dtype,
                                smoothing=smoothing)
    except PermissionError as err:  # EACCES / EPERM; writes go to a staging sibling of OUT, in its folder
        where = Path(err.filename).parent if err.filename else Path(args.out_dir).parent
        print(f"osp export: error: cannot write in {where} ({os.strerror(err.errno)}); choose a writable OUT",
              file=sys.stderr)
        raise SystemExit(1) from err
    except (CheckpointError, OSError, ValueError) as err:
        if isinstance(err, OSError) and err.errno == errno.EROFS:
            err = f"cannot write {err.filename} (read-only file system); choose a writable OUT"
        print(f"osp export: error: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    for warning in caught:
        if issubclass(warning.category, LayoutWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if args.format == "gguf":
        print(f"osp export: wrote {Path(out).resolve()}  "
              f"(llama.cpp: llama-completion -m {out} -p 'Once upon a time' -n 64)")
        return
    plain, _ = model.llama_compatible()
    how = ("LlamaForCausalLM: AutoModelForCausalLM.from_pretrained(path)" if plain else
           "osp custom code: AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    print(f"osp export: wrote {Path(out).resolve()}  ({how})")


if __name__ == "__main__":
    main()
