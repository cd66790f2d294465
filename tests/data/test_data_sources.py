"""Text sources: the demo corpus (from synthetic .deb files), local files, and the streamed hub path
(exercised offline through `datasets`' json builder)."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from osp.data import DemoCorpus, HubDataset, LocalFiles
from osp.data.demo import corpus as demo_corpus
from osp.data.sources import DataWarning
from osp.errors import DataError
from tests.data.data_builders import generated_documents


def test_demo_corpus_extracts_splits_and_caches(tmp_path, demo_debs):
    corpus = DemoCorpus(cache_dir=str(tmp_path / "cache"), deb_dir=str(demo_debs))
    corpus.prepare()
    train = [p.name for p in corpus.files("train")]
    val = [p.name for p in corpus.files("val")]
    assert train == ["emma.txt", "00_Gen.txt", "02_Matt.txt"]
    assert val == ["persuasion.txt", "01_Ruth.txt"]
    assert {p.parent.name for p in corpus.files("train")} == {"austen", "web_bible"}
    docs = list(corpus.documents("val"))
    assert docs[0].startswith("Persuasion\n") and docs[1].startswith("Where you go")
    # Nothing half-written is left behind, and the cleaned bible is never called by its trademark.
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    assert "World English" not in " ".join(p.name for p in (tmp_path / "cache").rglob("*"))

    fingerprint = corpus.fingerprint()
    shutil.rmtree(demo_debs)  # the cache is reused: the packages are not needed any more
    again = DemoCorpus(cache_dir=str(tmp_path / "cache"))
    assert again.fingerprint() == fingerprint
    assert list(again.documents("train")) == list(corpus.documents("train"))


def test_demo_corpus_without_bible(tmp_path, demo_debs):
    (demo_debs / "sword-text-web_426.0-1_all.deb").unlink()  # not needed
    corpus = DemoCorpus(include_bible=False, cache_dir=str(tmp_path / "c"), deb_dir=str(demo_debs))
    assert [p.name for p in corpus.files("train")] == ["emma.txt"]
    assert corpus.describe() == "demo (austen)"
    assert not (tmp_path / "c" / "corpus" / "web_bible").exists()


def test_demo_corpus_rebuilds_a_damaged_cache(tmp_path, demo_debs):
    corpus = DemoCorpus(cache_dir=str(tmp_path / "c"), deb_dir=str(demo_debs))
    emma = corpus.files("train")[0]
    emma.write_text("truncated")
    with pytest.warns(DataWarning, match=r"emma\.txt: damaged cache entry"):
        assert corpus.files("train")[0].read_text().startswith("EMMA")


def test_demo_corpus_missing_debs_explain_what_to_do(tmp_path):
    corpus = DemoCorpus(cache_dir=str(tmp_path / "c"), deb_dir=str(tmp_path))
    with pytest.raises(DataError, match="apt-get download r-cran-janeaustenr sword-text-web"):
        corpus.prepare()


def test_demo_corpus_without_apt_get(tmp_path, monkeypatch):
    monkeypatch.delenv("OSP_DEMO_DEB_DIR", raising=False)
    monkeypatch.setattr(demo_corpus.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get is not available") as err:
        DemoCorpus(cache_dir=str(tmp_path / "c")).prepare()
    assert "data=files" in str(err.value)


def test_demo_corpus_when_apt_get_fails(tmp_path, monkeypatch):
    calls = []

    class Failed:
        returncode, stdout, stderr = 100, "", "E: Unable to locate package r-cran-janeaustenr"

    def fake_apt(args, cwd):
        calls.append(args[0])
        return Failed()

    monkeypatch.delenv("OSP_DEMO_DEB_DIR", raising=False)
    monkeypatch.setattr(demo_corpus.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(demo_corpus, "_apt_get", fake_apt)
    with pytest.raises(DataError, match="Unable to locate package"):
        DemoCorpus(cache_dir=str(tmp_path / "c")).prepare()
    assert calls == ["download", "update"]  # a missing package list triggers one `apt-get update`


def test_local_files_formats(tmp_path):
    docs = generated_documents(6)
    (tmp_path / "a.txt").write_text(docs[0] + "\n\n" + docs[1])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": docs[2]}) + "\n\n" + json.dumps({"content": docs[3]}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": [docs[4], None, docs[5]]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")

    source = LocalFiles(paths=str(tmp_path), text_field="content", val_fraction=0.0)
    assert list(source.documents("train")) == [docs[0] + "\n\n" + docs[1], *docs[2:]]
    assert list(source.documents("val")) == []
    paragraphs = LocalFiles(paths=str(tmp_path / "*.txt"), txt_documents="paragraphs", val_fraction=0.0)
    assert len(list(paragraphs.documents("train"))) == 4  # two documents of two paragraphs each


def test_local_files_hash_split_is_disjoint_and_stable(corpus_files):
    source = LocalFiles(paths=[str(corpus_files / "*.jsonl"), str(corpus_files / "*.txt")], val_fraction=0.2)
    train, val = list(source.documents("train")), list(source.documents("val"))
    assert len(train) + len(val) == 64 and 4 <= len(val) <= 25
    assert not set(train) & set(val)
    # The split depends on the documents only, not on file order.
    patterns = [str(corpus_files / "*.txt"), str(corpus_files / "*.jsonl")]
    reordered = LocalFiles(paths=patterns, val_fraction=0.2)
    assert set(reordered.documents("val")) == set(val)


def test_local_files_val_paths_and_fingerprint(corpus_files):
    source = LocalFiles(paths=str(corpus_files / "*.jsonl"), val_paths=str(corpus_files / "book*.txt"))
    assert len(list(source.documents("val"))) == 3 and len(list(source.documents("train"))) == 61
    before = source.fingerprint()
    (corpus_files / "book0.txt").write_text("changed, and longer than before\n")
    assert source.fingerprint() != before


def test_local_files_errors(tmp_path):
    with pytest.raises(DataError, match="no .txt/.jsonl/.json/.parquet files match"):
        list(LocalFiles(paths=str(tmp_path / "missing*.txt")).documents("train"))
    with pytest.raises(DataError, match="data.source.paths is empty"):
        list(LocalFiles(paths=[]).documents("train"))
    (tmp_path / "x.jsonl").write_text('{"body": "text"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:1: no field 'text' \(found \['body'\]\)"):
        list(LocalFiles(paths=str(tmp_path / "x.jsonl")).documents("train"))
    (tmp_path / "y.jsonl").write_text("not json\n")
    with pytest.raises(DataError, match="y.jsonl:1: not a JSON object"):
        list(LocalFiles(paths=str(tmp_path / "y.jsonl")).documents("train"))
    with pytest.raises(ValueError, match="split must be one of"):
        list(LocalFiles(paths=str(tmp_path / "x.jsonl")).documents("test"))


def test_hub_source_streams_in_order_and_splits_by_rank(corpus_files):
    docs = [json.loads(line)["text"] for line in open(corpus_files / "web.jsonl")]
    source = HubDataset(name="json", data_files=str(corpus_files / "web.jsonl"), val_docs=5)
    assert list(source.documents("val")) == docs[:5]
    assert list(source.documents("train")) == docs[5:]
    shares = [list(source.stream("train", rank=r, world_size=2)) for r in (0, 1)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(docs[5:])


def test_hub_source_errors(corpus_files, tmp_path):
    with pytest.raises(DataError, match="data.source.name is empty"):
        HubDataset(name="")
    bad_field = HubDataset(name="json", data_files=str(corpus_files / "web.jsonl"), text_field="body")
    with pytest.raises(DataError, match="no field 'body'"):
        list(bad_field.documents("val"))
    missing = HubDataset(name="json", data_files=str(tmp_path / "nothing-here.jsonl"))
    with pytest.raises(DataError, match="cannot open hub dataset 'json'"):
        list(missing.documents("val"))
