"""Suspect input and damaged caches: non-UTF-8 and binary files, lines without whitespace, and cache
entries (token shards, tokenizers, the extracted demo corpus) whose bytes changed after they were written."""

from __future__ import annotations

import gzip
import json
import warnings

import numpy as np
import pytest

from osp.data import DemoCorpus, LocalFiles
from osp.data import files as files_source
from osp.data import tokenizer as tokenizer_module
from osp.data.files import read_documents
from osp.data.packing import cached_shard, load_shard, write_shard
from osp.data.sources import DataWarning
from osp.data.tokenizer import _pieces, _training_pieces, build_tokenizer, tokenizer_fingerprint
from osp.errors import DataError
from tests.data.data_builders import generated_documents


@pytest.fixture(autouse=True)
def _fresh_warning_registry(monkeypatch):
    monkeypatch.setattr(files_source, "_warned_files", set())  # "once per file" must not leak between tests


def _latin1_text(n_bad: int) -> bytes:
    """About 2,000 bytes of ASCII with `n_bad` Latin-1 bytes (0xE9, 'é'), each invalid in UTF-8."""
    words = generated_documents(1, words=400)[0].encode()[:2000]
    return words[:100] + b"caf\xe9 " * n_bad + words[100:]


def test_a_few_undecodable_bytes_warn_with_their_exact_count(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(_latin1_text(7))
    with pytest.warns(DataWarning, match=r"notes\.txt: 7 of its [\d,]+ bytes \(0\.\d%\) are not valid UTF-8"):
        (text,) = read_documents(path)
    assert text.count("\ufffd") == 7 and "caf\ufffd " in text


def test_real_replacement_characters_are_not_counted(tmp_path):
    path = tmp_path / "clean.txt"
    path.write_text("a valid \ufffd replacement character " * 20, encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        (text,) = read_documents(path)
    assert text.count("\ufffd") == 20


def test_warned_once_per_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(_latin1_text(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(read_documents(path))
        list(read_documents(path))
    assert [w.category for w in caught] == [DataWarning]


@pytest.mark.parametrize("name", ["mostly_latin1.txt", "mostly_latin1.jsonl.gz"])
def test_a_mostly_undecodable_file_is_refused(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".gz"):
        # Each line is valid JSON around invalid UTF-8, so the decoding rule (not json.loads) refuses it.
        line = b'{"text": "' + b"\xe9\xe8\xe0 abc " * 40 + b'"}\n'
        path.write_bytes(gzip.compress(line * 5))
    else:
        path.write_bytes(bytes(range(128, 256)) * 20 + b"some ascii")
    with pytest.raises(DataError,
                       match=rf"{name}: [\d,]+ of its [\d,]+ bytes \(\d+\.\d%\) are not valid UTF-8.*"
                             r"convert it to UTF-8"):
        list(read_documents(path))


def test_a_binary_file_is_refused(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_bytes(np.arange(1000, dtype=np.float32).tobytes())
    with pytest.raises(DataError,
                       match=r"weights\.txt: contains NUL bytes.*remove it from data\.source\.paths"):
        list(read_documents(path))


def test_utf16_text_is_refused_as_not_utf8(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes("Hello from a UTF-16 editor\n".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        list(read_documents(path))


def test_jsonl_with_a_few_bad_bytes_is_used_with_a_warning(tmp_path):
    path = tmp_path / "web.jsonl"
    path.write_bytes(b'{"text": "plain line"}\n' * 50 + b'{"text": "caf\xe9"}\n')
    with pytest.warns(DataWarning, match=r"web\.jsonl: 1 of its"):
        docs = list(read_documents(path))
    assert docs[-1] == "caf\ufffd" and len(docs) == 51


# ------------------------------------------------------------------------------------------------
# BPE training on text without whitespace
# ------------------------------------------------------------------------------------------------

def test_training_pieces_are_bounded_and_lossless():
    size = 64
    run = "x" * 1000  # no neutral cut point anywhere
    text = "A short start. " + run + " and an ordinary end " * 20
    pieces = list(_training_pieces(text, size))
    assert "".join(pieces) == text
    assert max(map(len, pieces)) <= 2 * size
    assert len(max(_pieces(text, size), key=len)) > 1000  # what encoding uses is not cut


def test_ordinary_text_trains_on_exactly_the_encoding_pieces():
    text = " ".join(generated_documents(30))
    assert list(_training_pieces(text)) == _pieces(text)  # so tokenizers of ordinary corpora are unchanged


def test_train_bpe_trains_on_bounded_pieces(monkeypatch):
    seen = []

    def spy(text, size=tokenizer_module._PIECE_CHARS):
        pieces = list(_training_pieces(text, size))
        seen.extend(pieces)
        return iter(pieces)

    monkeypatch.setattr(tokenizer_module, "_training_pieces", spy)
    tokenizer_module.train_bpe(["word " * 100, "y" * 50_000], vocab_size=300)
    assert "".join(seen).count("y") == 50_000
    assert max(map(len, seen)) <= 2 * tokenizer_module._PIECE_CHARS


# ------------------------------------------------------------------------------------------------
# damaged caches are detected by their checksums and rebuilt
# ------------------------------------------------------------------------------------------------

def _docs(lengths):
    return [np.arange(n, dtype=np.int64) % 200 for n in lengths]


def test_a_shard_with_a_flipped_byte_is_rebuilt(tmp_path):
    path = tmp_path / "s.json"
    original = write_shard(path, _docs([50, 30]), dtype=np.dtype(np.uint16), eos_id=255, piece_tokens=40)
    expected = np.array(original.read(0, original.num_tokens))
    assert all(piece["sha256"] for piece in json.loads(path.read_text())["pieces"])
    with open(tmp_path / "s-00001.bin", "r+b") as f:  # same size: only the checksum can tell
        f.seek(10)
        f.write(b"\x07")
    with pytest.warns(DataWarning,
                      match=r"s-00001\.bin: damaged cache entry \(missing, or its size or sha256"):
        assert load_shard(path) is None
    with pytest.warns(DataWarning):
        rebuilt = cached_shard(path, _docs([50, 30]), dtype=np.dtype(np.uint16), eos_id=255)
    np.testing.assert_array_equal(rebuilt.read(0, rebuilt.num_tokens), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # intact again: loads without a warning
        assert load_shard(path) is not None


def test_a_shard_with_an_unreadable_sidecar_is_rebuilt(tmp_path):
    path = tmp_path / "s.json"
    write_shard(path, _docs([20]), dtype=np.dtype(np.uint16), eos_id=255)
    path.write_text('{"format": 3, "dty')
    with pytest.warns(DataWarning, match=r"s\.json: damaged cache entry \(not readable JSON\)"):
        shard = cached_shard(path, _docs([20]), dtype=np.dtype(np.uint16), eos_id=255)
    assert shard.num_tokens == 21


def test_intact_cache_entries_load_without_warnings(tmp_path, corpus_files):
    source = LocalFiles(paths=str(corpus_files / "*"), val_fraction=0.1)
    build_tokenizer("bpe", source, 300, cache_dir=str(tmp_path))
    write_shard(tmp_path / "s.json", _docs([20]), dtype=np.dtype(np.uint16), eos_id=255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_tokenizer("bpe", source, 300, cache_dir=str(tmp_path))
        assert load_shard(tmp_path / "s.json") is not None


def test_a_damaged_cached_tokenizer_is_retrained(tmp_path, corpus_files):
    source = LocalFiles(paths=str(corpus_files / "*"), val_fraction=0.1)
    first = build_tokenizer("bpe", source, 300, cache_dir=str(tmp_path))
    (folder,) = (p for p in (tmp_path / "tokenizers").iterdir() if p.is_dir())
    tokenizer_json = folder / "tokenizer.json"
    tokenizer_json.write_bytes(tokenizer_json.read_bytes()[:-200])  # a truncated copy
    with pytest.warns(DataWarning,
                      match=r"damaged cache entry \(a file is missing or differs from checksums"):
        again = build_tokenizer("bpe", source, 300, cache_dir=str(tmp_path))
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(first)
    assert json.loads((folder / "checksums.json").read_text()).keys() >= {"tokenizer.json",
                                                                          "tokenizer_config.json"}


def test_a_demo_corpus_file_changed_in_place_is_extracted_again(tmp_path, demo_debs):
    DemoCorpus(cache_dir=str(tmp_path / "c"), deb_dir=str(demo_debs)).prepare()
    emma = next(p for p in (tmp_path / "c" / "corpus" / "austen").iterdir() if p.name == "emma.txt")
    original = emma.read_bytes()
    emma.write_bytes(original.replace(b"EMMA", b"AMME"))  # same size: only sha256 can tell
    corpus = DemoCorpus(cache_dir=str(tmp_path / "c"), deb_dir=str(demo_debs))
    with pytest.warns(DataWarning, match=r"emma\.txt: damaged cache entry"):
        corpus.prepare()
    assert emma.read_bytes() == original
