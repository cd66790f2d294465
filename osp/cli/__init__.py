"""`osp` command line: train | export | eval | report | data | bench | plan, one module per subcommand
here."""

from __future__ import annotations

import importlib
import sys

from osp.errors import OspError, error_line

USAGE = """usage: osp <command> [args]

commands:
  train   [hydra overrides]        train a model (default: the tiny recipe on the demo corpus, CPU)
  export  CHECKPOINT OUT           write a Hugging Face folder (or --format gguf: a llama.cpp file)
  eval    MODEL [--quant ...]      perplexity, W4A4 perplexity and kurtosis of a checkpoint or HF folder
  report  RUN_DIR [RUN_DIR ...]    compare runs: table + plots
  data    prepare|info             build or inspect the corpus, tokenizer and token shards
  bench   NAME                     benchmarks (osp bench --help lists them)
  plan    [overrides] [--gpu ...]   memory per device, FLOPs and time of a config on GPUs (no GPU needed)

`osp <command> --help` describes a command."""

COMMANDS = ("train", "export", "eval", "report", "data", "bench", "plan")  # modules osp.cli.<command>


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"osp: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(f"osp.cli.{command}")
    try:
        module.main(rest)
    except (OspError, OSError) as err:  # what a command did not turn into its own message
        message = error_line(err)
        if message is None:
            raise
        print(f"osp {command}: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None

