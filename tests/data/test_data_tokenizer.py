"""BPE training, the tokenizer cache, and batch encoding that must equal whole-document encoding."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from osp.data import LocalFiles
from osp.data import tokenizer as tokenizer_module
from osp.data.tokenizer import (
    EOS_TOKEN,
    DocumentEncoder,
    build_tokenizer,
    load_pretrained,
    token_dtype,
    tokenizer_fingerprint,
    train_bpe,
    vocab_size_of,
)
from osp.errors import DataError
from tests.data.data_builders import generated_documents


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return train_bpe(generated_documents(40), vocab_size=320)


def test_bpe_has_eos_and_round_trips(bpe):
    assert bpe.eos_token == EOS_TOKEN and bpe.convert_tokens_to_ids(EOS_TOKEN) == bpe.eos_token_id
    assert 257 <= len(bpe) <= 320 and vocab_size_of(bpe) == len(bpe)
    text = "The lady said: \u201cA visit, at 10 o'clock?\u201d\n\n  Indented \u00e9t\u00e9 \u4f60"
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    assert bpe.decode(ids) == text
    assert EOS_TOKEN not in bpe.decode(ids)


def test_bpe_vocab_must_hold_the_bytes():
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(["abc"], vocab_size=100)


def test_tokenizer_cache_hit_gives_same_ids(tmp_path, corpus_files, monkeypatch):
    source = LocalFiles(paths=str(corpus_files / "*"), val_fraction=0.1)
    first = build_tokenizer("bpe", source, 300, cache_dir=str(tmp_path))
    (folder,) = (p for p in (tmp_path / "tokenizers").iterdir() if p.is_dir())
    assert folder.name.startswith("bpe300-") and (folder / "tokenizer.json").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    second = build_tokenizer("bpe", source, 300, cache_dir=str(tmp_path))
    text = " ".join(generated_documents(3, seed=9))
    assert first.encode(text) == second.encode(text)
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)
    # A different vocabulary size is a different cache entry.
    monkeypatch.undo()
    build_tokenizer("bpe", source, 280, cache_dir=str(tmp_path))
    assert len([p for p in (tmp_path / "tokenizers").iterdir() if p.is_dir()]) == 2


def test_pretrained_tokenizer_from_a_folder(tmp_path, bpe):
    bpe.save_pretrained(tmp_path / "tok")
    loaded = load_pretrained(str(tmp_path / "tok"))
    assert loaded.encode("a visit") == bpe.encode("a visit")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_pretrained(str(tmp_path / "missing"))


def test_encoder_cuts_long_documents_without_changing_ids(bpe):
    encoder = DocumentEncoder(bpe)
    assert encoder.can_cut and encoder.dtype == np.uint16
    long_doc = "\n\n".join(generated_documents(200, words=80))  # > 4 KB pieces
    docs = [long_doc, "", "short one", long_doc[:5000] + "  \n  x"]
    encoded = list(encoder.encode(docs))
    whole = [bpe.backend_tokenizer.encode(d, add_special_tokens=False).ids for d in docs]
    assert [e.tolist() for e in encoded] == whole


def test_encoder_falls_back_to_whole_documents_when_cuts_change_ids():
    # A normalizer that strips each input would drop the space at every cut: ids would change.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Strip()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(generated_documents(20), trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    encoder = DocumentEncoder(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN))
    assert not encoder.can_cut
    doc = " ".join(generated_documents(100))
    assert next(encoder.encode([doc])).tolist() == tok.encode(doc, add_special_tokens=False).ids


def test_token_dtype():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128256) == np.uint32


def test_saved_tokenizer_files_load_as_a_plain_fast_tokenizer(bpe, tmp_path):
    import json

    from transformers import AutoTokenizer

    from osp.data.tokenizer import save_tokenizer

    save_tokenizer(bpe, tmp_path / "a", model_max_length=64)
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    # transformers 4.x knows no TokenizersBackend
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
    assert config["model_max_length"] == 64
    assert not {"is_local", "local_files_only", "name_or_path", "_commit_hash", "backend"} & set(config)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temporary left

    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert isinstance(loaded, PreTrainedTokenizerFast) and loaded.eos_token_id == bpe.eos_token_id
    encoded = loaded("word " * 500, truncation=True)
    assert set(encoded) == {"input_ids", "attention_mask"} and len(encoded["input_ids"]) == 64
    text = "The lady said: a visit, at ten."
    assert loaded(text)["input_ids"] == bpe(text)["input_ids"]

    save_tokenizer(loaded, tmp_path / "b")  # a re-save keeps the limit and stays clean
    assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text()) == config
