"""`osp bench data` on a generated corpus: both arms run on the same text and the shard holds the raw ids."""

from __future__ import annotations

import pytest

from osp.bench import data as bench_data
from tests.support.synthetic_text import write_corpus


def test_bench_data_compares_osp_with_raw_tokenizers(tmp_path, capsys):
    paths = write_corpus(tmp_path / "corpus")
    result = bench_data.main(["--source", "files", "--chars", "200000", "--repeats", "2",
                              f"source.paths={paths}", f"cache_dir={tmp_path / 'cache'}", "vocab_size=400"])
    assert result["documents"] > 0 and result["chars"] > 0
    assert result["tokens"] > 0 and set(result["seconds"]) == {"raw", "osp"}
    assert result["ratio"] == pytest.approx(result["seconds"]["raw"] / result["seconds"]["osp"])
    out = capsys.readouterr().out
    assert "osp / raw throughput" in out and "ids identical" in out


def test_bench_data_refuses_a_shard_that_differs(tmp_path, monkeypatch):
    """The id check can fail: a shard writer that drops a token is caught."""
    paths = write_corpus(tmp_path / "corpus")
    from osp.data import packing  # run() imports write_shard from here when it runs

    original = packing.write_shard

    def lossy(path, docs, **kwargs):
        return original(path, (d[1:] for d in docs), **kwargs)

    monkeypatch.setattr(packing, "write_shard", lossy)
    with pytest.raises(AssertionError, match="differs from the raw"):
        bench_data.main(["--source", "files", "--chars", "50000", "--repeats", "1", f"source.paths={paths}",
                         f"cache_dir={tmp_path / 'cache'}", "vocab_size=400"])
