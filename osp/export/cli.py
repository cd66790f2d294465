"""`osp export CHECKPOINT OUT_DIR`: a training checkpoint (or run dir) -> a Hugging Face folder."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .hf import export_hf
from .layout import LayoutWarning
from .load import CheckpointError, load_model

DESCRIPTION = """Write a Hugging Face folder (config.json, generation_config.json, safetensors, tokenizer)
from an osp checkpoint. Models whose blocks all fold (RMSNorm/SSNorm, EmbProj) become a plain LlamaForCausalLM;
others ship their modeling code (load with trust_remote_code=True)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osp export", description=DESCRIPTION)
    parser.add_argument("checkpoint", help="a Lightning .ckpt, a run dir (uses checkpoints/last.ckpt), "
                                           "or an exported folder")
    parser.add_argument("out_dir", help="folder to write (must be empty or absent unless --force)")
    parser.add_argument("--tokenizer",
                        help="tokenizer folder (default: <run_dir>/tokenizer, or the exported folder's own)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR (atomically)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="cast the weights (default: as trained)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="split weights into shards of at most this size (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        model, tokenizer = load_model(args.checkpoint, tokenizer=args.tokenizer)
        if tokenizer is None:
            print("osp export: no tokenizer found; writing the model only (pass --tokenizer PATH)",
                  file=sys.stderr)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LayoutWarning)
            out = export_hf(model, args.out_dir, tokenizer=tokenizer, force=args.force,
                            max_shard_size=args.max_shard_size, dtype=args.dtype)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"osp export: error: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    for warning in caught:
        if issubclass(warning.category, LayoutWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    plain, _ = model.llama_compatible()
    how = ("LlamaForCausalLM: AutoModelForCausalLM.from_pretrained(path)" if plain else
           "osp custom code: AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    print(f"osp export: wrote {Path(out).resolve()}  ({how})")


if __name__ == "__main__":
    main()
