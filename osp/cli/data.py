"""`osp data prepare | info`: build the corpus, tokenizer and token shards ahead of a run, or show the cache.

    osp data prepare                                   # the demo corpus (configs/data/demo.yaml)
    osp data prepare --source files source.paths='/corpus/*.jsonl' vocab_size=8192
    osp data prepare --config my_data.yaml seq_len=1024
    osp data info                                      # what the cache holds

Settings come from the preset `configs/data/<source>.yaml` (or --config), then `key=value` overrides, exactly as
`osp train data=<source> data.key=value` would compose them, so a prepared cache is the one training finds.
"""  # noqa: E501 - printed as is by `osp data --help` (RawDescriptionHelpFormatter)

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from osp.conf import data_config
from osp.data.cache import cache_root, human_bytes
from osp.errors import DataError, OspError, one_line
from osp.tables import format_rows


def _print_rows(rows: list[tuple[str, ...]]) -> None:
    print(format_rows(rows, listing=True))


def prepare(values: dict[str, Any]) -> dict[str, Any]:
    """Build everything a run needs and print where it is; returns the summary."""
    from osp.data import DataConfig, DemoCorpus, TokenPipeline

    started = time.perf_counter()
    data = TokenPipeline(DataConfig.from_dict(values))
    data.prepare()
    summary = data.summary()
    summary["seconds"] = round(time.perf_counter() - started, 2)
    print(f"source     {summary['source']}")
    if isinstance(data.source, DemoCorpus):
        for name, manifest in data.source.manifests().items():
            docs = manifest["documents"]
            print(f"  {name:<10} {sum(d['split'] == 'train' for d in docs)} train / "
                  f"{sum(d['split'] == 'val' for d in docs)} val documents, "
                  f"{human_bytes(sum(d['bytes'] for d in docs))} from {manifest['package']}")
    print(f"tokenizer  {summary['tokenizer']} (vocab {summary['vocab_size']})"
          + (f"  {summary['tokenizer_path']}" if "tokenizer_path" in summary else ""))
    rows = [("split", "tokens", "documents", f"blocks of {data.block_len}", "size", "files", "path")]
    for split in ("train", "val"):
        info = summary[split]
        if info.get("streamed"):
            rows.append((split, "streamed", "-", "-", "-", "-", "-"))
        else:
            rows.append((split, f"{info['tokens']:,}", f"{info['documents']:,}", f"{info['blocks']:,}",
                         human_bytes(info["bytes"]), str(info["files"]), info["path"]))
    _print_rows(rows)
    print(f"ready in {summary['seconds']:.1f} s (cache: {cache_root(values.get('cache_dir'))})")
    return summary


def info(cache_dir: str | None = None) -> None:
    """List the cached corpora, tokenizers and token shards (builds nothing)."""
    root = cache_root(cache_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"the cache {root} is a file; set OSP_CACHE_DIR (or --cache-dir) to a folder")
    print(f"cache: {root}" + ("" if root.exists() else " (empty)"))
    corpora = sorted((root / "corpus").glob("*/manifest.json"))
    if corpora:
        print("corpora:")
        rows = [("name", "documents (train/val)", "text", "package")]
        for manifest_path in corpora:
            manifest = json.loads(manifest_path.read_text())
            docs = manifest["documents"]
            n_val = sum(d["split"] == "val" for d in docs)
            rows.append((manifest_path.parent.name, f"{len(docs) - n_val}/{n_val}",
                         human_bytes(sum(d["bytes"] for d in docs)), manifest.get("package", "")))
        _print_rows(rows)
    tokenizers = sorted((root / "tokenizers").glob("*/tokenizer.json"))
    if tokenizers:
        print("tokenizers:")
        rows = [("folder", "vocab")]
        for path in tokenizers:
            vocab = json.loads(path.read_text())["model"]["vocab"]
            rows.append((str(path.parent), f"{len(vocab):,}"))
        _print_rows(rows)
    shards = sorted((root / "shards").glob("*.json"))
    if shards:
        print("token shards:")
        rows = [("split", "source", "tokens", "dtype", "size", "files", "index")]
        for path in shards:
            try:
                meta = json.loads(path.read_text())
                pieces = [path.parent / piece["file"] for piece in meta["pieces"]]
                size = human_bytes(sum(p.stat().st_size for p in pieces if p.exists()))
            except (ValueError, OSError, KeyError, TypeError):  # damaged, or an older format
                rows.append(("?", "?", "?", "?", "?", "?", f"{path} (damaged or older: rebuilt on next use)"))
                continue
            rows.append((meta.get("split", "?"), meta.get("source", "?"), f"{meta['num_tokens']:,}",
                         meta["dtype"], size, str(len(pieces)), str(path)))
        _print_rows(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="osp data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare",
                               help="build corpus, tokenizer and token shards; print paths and sizes")
    prep.add_argument("--source", help="data preset (demo | files | hub | smollm); default demo")
    prep.add_argument("--config", help="a data config file instead of a preset")
    prep.add_argument("--json", action="store_true", help="also print the summary as JSON")
    prep.add_argument("overrides", nargs="*",
                      help="key=value settings, e.g. source.paths='/data/*.txt' vocab_size=8192")
    show = commands.add_parser("info", help="list the cached corpora, tokenizers and shards")
    show.add_argument("--cache-dir", help="cache root (default: $OSP_CACHE_DIR or ~/.cache/osp)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    if args.command == "info":
        try:
            info(args.cache_dir)
        except OspError as err:
            raise SystemExit(f"osp data: error: {one_line(str(err))}") from None
        return
    try:
        summary = prepare(data_config(args.source, args.config, args.overrides))
    except OspError as err:
        raise SystemExit(f"osp data: error: {one_line(str(err))}") from None
    if args.json:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
