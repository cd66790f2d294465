"""`osp bench NAME [args]`: dispatch to the benchmark module's main(argv)."""

from __future__ import annotations

import importlib
import sys

# Benchmark name -> module in osp.bench.
BENCHES = {
    "compile": "compile",
    "data": "data",
    "distributed": "distributed",
    "optim": "optim",
    "paper_table": "paper_table",
    "protocols": "protocols",
    "quant": "quant",
    "sweep": "sweep",
    "train": "training_loops",
}


def available() -> list[str]:
    return sorted(BENCHES)


def main(argv: list[str]) -> None:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: osp bench NAME [args]   (NAME: " + " | ".join(names) + ")")
        return
    name = argv[0].replace("-", "_")
    if name not in names:
        print(f"osp bench: unknown benchmark {argv[0]!r}; choose one of {names}", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(f"osp.bench.{BENCHES[name]}").main(argv[1:])
