"""`osp bench data`: tokenization throughput of osp's shard builder against raw `tokenizers` on the same text.

    osp bench data                       # the demo corpus, its BPE 4096
    osp bench data --source files source.paths='corpus/*.jsonl' --chars 50000000

Both arms encode the same documents (the first `--chars` characters of the training split, held in memory
so that reading files is not timed) with the same tokenizer:

- raw: `tokenizers.Tokenizer.encode_batch` on the documents as they are (the Rust library's own speed, on
  every core it is allowed);
- osp: what `osp data prepare` runs, `DocumentEncoder.encode` (long documents cut at id-neutral points,
  batches of ~4M characters) feeding `write_shard` (uint16/uint32 ids, pieces + an index) in a temporary
  folder.

Arms alternate (raw, osp, raw, osp, ...) and each reports its median over `--repeats`, so drifting load on a
shared machine hits both alike. The ids of both arms are compared once: the shard must hold exactly the raw
ids. Prints a small table and the ratio osp / raw (the target is >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _documents(data: Any, chars: int) -> list[str]:
    docs, total = [], 0
    for doc in data.source.documents("train"):
        docs.append(doc)
        total += len(doc)
        if total >= chars:
            break
    return docs


def run(values: dict[str, Any], chars: int, repeats: int) -> dict[str, Any]:
    from osp.data import DataConfig, TokenPipeline
    from osp.data.packing import write_shard
    from osp.data.tokenizer import DocumentEncoder, token_dtype, vocab_size_of

    data = TokenPipeline(DataConfig.from_dict(values))
    tokenizer = data.tokenizer
    docs = _documents(data, chars)
    n_chars = sum(map(len, docs))
    backend = tokenizer.backend_tokenizer
    encoder = DocumentEncoder(tokenizer)
    dtype = token_dtype(vocab_size_of(tokenizer))
    eos = tokenizer.eos_token_id

    with tempfile.TemporaryDirectory(prefix="osp-bench-data-") as tmp:
        shard_path = Path(tmp) / "bench.json"

        def raw() -> int:
            return sum(len(e.ids) for e in backend.encode_batch(docs, add_special_tokens=False))

        def osp() -> int:
            shard = write_shard(shard_path, encoder.encode(docs), dtype=dtype, eos_id=eos)
            return shard.num_tokens - shard.meta["num_documents"]  # without the EOS separators

        # Same ids: the shard is the raw ids with one EOS after each document.
        expected = [np.asarray(e.ids, dtype=dtype)
                    for e in backend.encode_batch(docs, add_special_tokens=False)]
        shard = write_shard(shard_path, encoder.encode(docs), dtype=dtype, eos_id=eos)
        stored = shard.read(0, shard.num_tokens)
        joined = np.concatenate([np.append(ids, np.array([eos], dtype=dtype)) for ids in expected])
        if not np.array_equal(stored, joined):
            raise AssertionError("osp's shard differs from the raw tokenizer's ids")
        times: dict[str, list[float]] = {"raw": [], "osp": []}
        tokens = {}
        for _ in range(repeats):
            for name, fn in (("raw", raw), ("osp", osp)):
                start = time.perf_counter()
                tokens[name] = fn()
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "documents": len(docs), "chars": n_chars, "tokens": tokens["raw"], "repeats": repeats,
        "seconds": median, "chars_per_s": {k: n_chars / s for k, s in median.items()},
        "tokens_per_s": {k: tokens["raw"] / s for k, s in median.items()},
        "ratio": median["raw"] / median["osp"], "threads": os.cpu_count(),
        "tokenizer": data.config.tokenizer, "source": data.source.describe(),
    }


def format_result(r: dict[str, Any]) -> str:
    lines = [f"tokenization: {r['source']}, tokenizer {r['tokenizer']}; {r['documents']:,} documents, "
             f"{r['chars'] / 1e6:,.1f}M characters -> {r['tokens'] / 1e6:,.2f}M tokens; "
             f"median of {r['repeats']}",
             f"{'arm':<44}{'seconds':>9}{'M chars/s':>11}{'M tokens/s':>12}"]
    names = {"raw": "raw tokenizers encode_batch", "osp": "osp DocumentEncoder + write_shard"}
    for key, label in names.items():
        lines.append(f"{label:<44}{r['seconds'][key]:>9.2f}{r['chars_per_s'][key] / 1e6:>11.2f}"
                     f"{r['tokens_per_s'][key] / 1e6:>12.2f}")
    lines.append(f"osp / raw throughput: {r['ratio']:.2f} (target >= 0.90); ids identical")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from osp.conf import data_config

    parser = argparse.ArgumentParser(prog="osp bench data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="demo", help="data preset (configs/data): demo | files | ...")
    parser.add_argument("--chars", type=int, default=20_000_000, help="characters of training text to encode")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*",
                        help="data config overrides key=value (as for osp data prepare)")
    args = parser.parse_intermixed_args(argv)
    result = run(data_config(args.source, None, args.overrides), args.chars, args.repeats)
    print(format_result(result))
    return result
