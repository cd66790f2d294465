"""`osp data prepare | info`."""

from __future__ import annotations

import json

import pytest

from osp.cli.data import main
from osp.conf import data_config


def test_prepare_files_then_info(tmp_path, corpus_files, capsys):
    cache = tmp_path / "cache"
    main(["prepare", "--source", "files", f"source.paths={corpus_files}/*", "vocab_size=300", "seq_len=15",
          "source.val_fraction=0.2", f"cache_dir={cache}", "--json"])
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["vocab_size"] <= 300 and summary["train"]["tokens"] > summary["val"]["tokens"] > 0
    assert summary["train"]["blocks"] == summary["train"]["tokens"] // 16
    assert f"{summary['train']['tokens']:,}" in out and summary["train"]["path"] in out

    assert summary["train"]["files"] == 1 and summary["train"]["path"].endswith(".json")
    (cache / "shards" / "files-train-0123456789abcdef.json").write_text('{"format": 2, "num_tokens": 5}')
    main(["info", "--cache-dir", str(cache)])
    out = capsys.readouterr().out
    assert "tokenizers:" in out and "token shards:" in out and summary["val"]["path"] in out
    assert "files-train-0123456789abcdef.json (damaged or older: rebuilt on next use)" in out


def test_prepare_the_demo_corpus_from_local_packages(tmp_path, demo_debs, capsys):
    main(["prepare", f"source.deb_dir={demo_debs}", f"cache_dir={tmp_path / 'cache'}", "vocab_size=260",
          "seq_len=7", "batch_size=2"])
    out = capsys.readouterr().out
    assert "demo (austen + web_bible)" in out
    assert "austen     1 train / 1 val documents" in out and "web_bible  2 train / 1 val documents" in out
    main(["info", "--cache-dir", str(tmp_path / "cache")])
    assert "sword-text-web_426.0-1_all.deb" in capsys.readouterr().out


def test_config_presets_and_errors(tmp_path, corpus_files):
    values = data_config("demo", None, ["seq_len=64", "source.include_bible=false"])
    assert values["seq_len"] == 64 and values["source"]["include_bible"] is False and values["seed"] == 1234
    with pytest.raises(SystemExit, match="presets: demo, files, hub"):
        main(["prepare", "--source", "nope"])
    with pytest.raises(SystemExit, match="key=value"):
        main(["prepare", "seq_len"])
    with pytest.raises(SystemExit, match="val split is empty.*data.source.val_fraction is 0.01: raise it"):
        main(["prepare", "--source", "files", f"source.paths={corpus_files}/book0.txt",
              f"cache_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="no .txt/.jsonl/.json/.parquet files match"):
        main(["prepare", "--source", "files", f"source.paths={tmp_path}/none*.txt", f"cache_dir={tmp_path}"])
