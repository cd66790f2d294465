"""`osp bench NAME [args]`: dispatch to osp.bench.<NAME>.main(argv)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import osp.bench


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(osp.bench.__path__) if m.name not in ("cli",))


def main(argv: list[str]) -> None:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: osp bench NAME [args]   (NAME: " + " | ".join(names) + ")")
        return
    name = argv[0].replace("-", "_")
    if name not in names:
        print(f"osp bench: unknown benchmark {argv[0]!r}; choose one of {names}", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(f"osp.bench.{name}").main(argv[1:])
