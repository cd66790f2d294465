"""Loading the tokenizer that goes into an export: an object as it is, or a folder read without remote code.

osp writes tokenizer folders with a `tokenizer.json` (osp.data.tokenizer.save_tokenizer), which
PreTrainedTokenizerFast reads directly. AutoTokenizer would look at a custom-code export's config.json
first, and transformers then asks on stdin whether to run that code; the tokenizer never needs it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from osp.errors import ExportError, PathNotFoundError

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(folder: str | Path, required: bool = False) -> Any:
    """The tokenizer in `folder`, or None when it has none (FileNotFoundError if `required`)."""
    folder = Path(folder)
    if not (folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)):
        if required:
            raise PathNotFoundError(f"no tokenizer files in {folder}")
        log.info("osp: no tokenizer found in %s", folder)
        return None
    if (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def check_vocabulary(tokenizer: Any, vocab_size: int) -> None:
    """Refuse a tokenizer whose vocabulary is not the model's, in either direction: ids the model cannot
    embed, or rows of the model that no token reaches (another run's tokenizer, most likely). The one
    difference allowed is a model vocabulary padded to the next multiple of 64 or 128, as converters and
    trainers pad."""
    if tokenizer is None:
        return
    ids = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    padded = {ids, -(-ids // 64) * 64, -(-ids // 128) * 128}
    if vocab_size not in padded:
        raise ExportError(f"the tokenizer has {ids} tokens but the model's vocab_size is {vocab_size}; "
                          "export with the tokenizer the model was trained with (--tokenizer PATH)")


def as_tokenizer(tokenizer: Any) -> Any:
    """An HF tokenizer object as it is; a folder path is loaded (it must hold a tokenizer); None stays
    None."""
    if tokenizer is None or hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    if not Path(tokenizer).is_dir():
        raise PathNotFoundError(f"tokenizer folder {tokenizer} does not exist")
    return load_tokenizer(tokenizer, required=True)
