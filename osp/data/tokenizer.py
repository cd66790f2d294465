"""Tokenizers: a pretrained Hugging Face tokenizer by name/path, or a byte-level BPE trained on the
training split of the corpus and cached by (corpus fingerprint, vocab size).

Both come back as `transformers.PreTrainedTokenizerFast` with an EOS token, because export writes the
tokenizer next to the model and the packer separates documents with EOS.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from osp.atomic import atomic_path, write_json
from osp.data.cache import cache_root, file_lock, file_sha256, fingerprint
from osp.data.sources import TextSource, warn_damaged
from osp.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
BPE = "bpe"  # the `tokenizer` config value that selects a BPE trained on the corpus
MIN_BPE_VOCAB = 257  # the 256 byte symbols + EOS

# Just before a single space that sits between two non-space characters: byte-level pre-tokenizers
# (GPT-2, Llama 3 style) always start a new pre-token there (the space joins the next word), so a
# document cut at such points encodes to exactly the same ids as the whole document.
_NEUTRAL_CUT = re.compile(r"(?<=\S)(?= \S)")
_PIECE_CHARS = 4096  # long documents are cut into pieces of about this size for parallel encoding
_BATCH_CHARS = 4_000_000  # characters per encode_batch call: bounded memory, enough work per call


def _pieces(text: str, size: int = _PIECE_CHARS) -> list[str]:
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        match = _NEUTRAL_CUT.search(text, start + size)
        end = match.start() if match else len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def _training_pieces(text: str, size: int = _PIECE_CHARS) -> Iterator[str]:
    """`_pieces` of `text`, none longer than twice `size` characters, for BPE training.

    The BPE trainer's time grows faster than linearly with the length of one pre-token (a 400k-character
    line without whitespace takes 10 s, a few million take many minutes), so a piece that found no
    neutral cut point near `size` is cut hard every `size` characters. Ordinary text never needs that
    (its pieces end within a word of `size`); encoding is unaffected (it cuts only at neutral points).
    """
    for piece in _pieces(text, size):
        if len(piece) <= 2 * size:
            yield piece
        else:
            yield from (piece[i : i + size] for i in range(0, len(piece), size))


def train_bpe(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style, no prefix space) with `<|endoftext|>` as EOS, trained on `texts`.

    On a small corpus the vocabulary can come out smaller than `vocab_size` (no pair left to merge).
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"vocab_size must be at least {MIN_BPE_VOCAB} for a byte-level BPE, "
                         f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    pieces = (piece for text in texts for piece in _training_pieces(text))
    tokenizer.train_from_iterator(pieces, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN)


def load_pretrained(name_or_path: str) -> PreTrainedTokenizerFast:
    """A pretrained (fast) tokenizer from a local folder or the hub cache."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except Exception as err:  # offline, unknown name, or a folder without tokenizer files
        raise DataError(f"cannot load tokenizer {name_or_path!r}: {type(err).__name__}: {err}") from err
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise DataError(f"tokenizer {name_or_path!r} has no fast (Rust) version; osp needs one")
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} has no EOS token to separate documents")
    return tokenizer


def _limit_chars(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    total = 0
    for text in texts:
        if max_chars is not None and total >= max_chars:
            return
        yield text if max_chars is None else text[: max_chars - total]
        total += len(text)


def bpe_cache_dir(corpus_fingerprint: str, vocab_size: int, max_train_chars: int | None,
                  cache_dir: str | None = None) -> Path:
    key = fingerprint("bpe", corpus_fingerprint, vocab_size, max_train_chars)[:16]
    return cache_root(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{key}"


def build_tokenizer(spec: str, source: TextSource, vocab_size: int = 4096, *,
                    max_train_chars: int | None = None,
                    cache_dir: str | None = None) -> PreTrainedTokenizerFast:
    """`spec == "bpe"`: train (or load the cached) BPE on `source`'s training split; else a pretrained one.

    The cache entry is a Hugging Face tokenizer folder; a second run loads it in milliseconds.
    """
    if spec != BPE:
        return load_pretrained(spec)
    folder = bpe_cache_dir(source.fingerprint(), vocab_size, max_train_chars, cache_dir)
    if not _intact(folder):
        with file_lock(folder.parent / f".{folder.name}.lock"):
            if not _intact(folder):
                if (folder / _CHECKSUMS).exists():
                    warn_damaged(folder, f"a file is missing or differs from {_CHECKSUMS}")
                shutil.rmtree(folder, ignore_errors=True)  # damaged, or from a version without checksums
                tokenizer = train_bpe(_limit_chars(source.documents("train"), max_train_chars), vocab_size)
                with atomic_path(folder) as tmp:
                    save_tokenizer(tokenizer, tmp)
                    write_json(tmp / _CHECKSUMS, {p.name: file_sha256(p) for p in tmp.iterdir()})
    # Always use the loaded copy, so its fingerprint is the same on the first and on later runs.
    return PreTrainedTokenizerFast.from_pretrained(folder)


_CHECKSUMS = "checksums.json"  # {file name: sha256} of a cached tokenizer folder, written with it


def _intact(folder: Path) -> bool:
    """Whether a cached tokenizer folder is complete and every file matches its recorded sha256."""
    try:
        sums = json.loads((folder / _CHECKSUMS).read_text())
        return bool(sums) and all(file_sha256(folder / name) == digest for name, digest in sums.items())
    except (OSError, ValueError, AttributeError):
        return False


# Keys that transformers records while loading (where the files came from) and then saves back.
_LOAD_TIME_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash", "backend")
_NO_MAX_LENGTH = 10**29  # transformers writes int(1e30) for "no limit"
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]  # no token_type_ids: Llama's forward has none


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | os.PathLike,
                   model_max_length: int | None = None) -> Path:
    """Write `tokenizer` as a folder that transformers 4.4x through 5.x load as `PreTrainedTokenizerFast`.

    transformers 5 saves `"tokenizer_class": "TokenizersBackend"` (unknown to 4.x), no `model_input_names`
    (so 4.x also returns `token_type_ids`, which `generate` rejects), `model_max_length` 1e30 and the
    load-time keys of the copy it saved from; this rewrites `tokenizer_config.json` without them.
    `model_max_length`: the trained context (what truncation should cut to); None keeps a real limit the
    tokenizer already has and otherwise leaves the key out.
    Every file is replaced atomically; other files in `folder` are kept. Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", suffix=".tmp", dir=folder))
    try:
        tokenizer.save_pretrained(str(tmp))
        config_path = tmp / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        for key in _LOAD_TIME_KEYS:
            config.pop(key, None)
        known = config.pop("model_max_length", None)
        if model_max_length is None and isinstance(known, int) and known < _NO_MAX_LENGTH:
            model_max_length = known  # a real limit saved before: keep it
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config["model_input_names"] = list(MODEL_INPUT_NAMES)
        if model_max_length is not None:
            config["model_max_length"] = int(model_max_length)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for path in tmp.iterdir():
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """Identity of the id mapping (vocabulary, merges, normalization, EOS): the token shard cache key."""
    return fingerprint(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id)


def vocab_size_of(tokenizer: PreTrainedTokenizerFast) -> int:
    """One more than the largest token id (what a model's embedding must cover)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id (uint16 up to 65,536 tokens)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class DocumentEncoder:
    """Batch-encodes documents to id arrays without special tokens (EOS is added by the packer).

    Long documents are cut at boundaries that do not change the result (checked once per tokenizer on
    a probe text; a tokenizer that adds a prefix to every input, like SentencePiece's metaspace, is
    encoded whole), and many pieces go to the Rust encoder at once so that it can use every core.
    """

    _PROBE = ("First line.\nSecond  line, isn't it? (Yes) 42 times\n  indented \n\n\"New\" "
              "para\u2014caf\u00e9 \u4f60\u597d. \tTab -- x=1;y  z\u00a0w 'quoted' I'll we've 3.14 end")

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        # A private copy: a user-visible tokenizer may have truncation/padding switched on.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.dtype = token_dtype(vocab_size_of(tokenizer))
        whole = self._encode([self._PROBE])[0]
        cut = list(itertools.chain.from_iterable(self._encode(_pieces(self._PROBE, size=1))))
        self.can_cut = whole == cut

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, documents: Iterable[str]) -> Iterator[np.ndarray]:
        """Token ids of each document, in order."""
        batch: list[str] = []
        counts: list[int] = []
        size = 0
        for doc in documents:
            pieces = _pieces(doc) if self.can_cut else [doc]
            batch.extend(pieces)
            counts.append(len(pieces))
            size += len(doc)
            if size >= _BATCH_CHARS:
                yield from self._flush(batch, counts)
                batch, counts, size = [], [], 0
        if batch:
            yield from self._flush(batch, counts)

    def _flush(self, batch: list[str], counts: list[int]) -> Iterator[np.ndarray]:
        ids = self._encode(batch)
        pos = 0
        for n in counts:
            yield np.fromiter(itertools.chain.from_iterable(ids[pos : pos + n]), dtype=self.dtype)
            pos += n
