"""GGUF export: an osp Transformer -> one `.gguf` file that llama.cpp (and Ollama, LM Studio...) runs.

GGUF has no place for custom code, so only models that fold into a plain Llama
(`Transformer.llama_compatible()`) are exported; the weights are the HF export's (`hf_state_dict`:
SSNorm and EmbProj already folded), renamed to llama.cpp's tensor names. Two conventions differ from
Hugging Face and are handled here, the way llama.cpp's own `convert_hf_to_gguf.py` (LlamaModel) does:
- RoPE: HF rotates the two halves of each head (rotate_half), GGML rotates adjacent pairs, so the rows
  of Q and K are permuted per head (`permute_qk`); attention scores are unchanged.
- dtypes: 1-D tensors and norms stay f32; `q8_0` falls back to f16 where a row is not a multiple of 32.
The tokenizer must be a byte-level BPE with the GPT-2 pre-tokenizer (osp's own BPE is), because that is
what llama.cpp's "gpt2" tokenizer model with pre-tokenizer "gpt-2" re-implements.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from osp.errors import ExportError
from osp.model import ModelConfig, Transformer
from osp.quant.smooth import Smoothing

from .hf import CUSTOM_BLOCK_KEYS, hf_state_dict
from .targets import atomic_file, check_file_target
from .tokenizer import as_tokenizer, check_vocabulary

log = logging.getLogger(__name__)

QT = gguf.GGMLQuantizationType
# --outtype -> (general.file_type, type of the 2-D weights); the names are llama.cpp's converter's.
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, QT]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, QT.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, QT.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, QT.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
}
ARCH = "llama"
TOKENIZER_PRE = "gpt-2"  # llama.cpp's name for the GPT-2 pre-tokenizer regex (LLAMA_VOCAB_PRE_TYPE_GPT2)


class GGUFExportError(ExportError):
    """The model or tokenizer cannot be written as a llama.cpp GGUF file."""


def export_gguf(
    model: Transformer,
    out: str | os.PathLike,
    tokenizer: Any,
    outtype: str = "f16",
    force: bool = False,
    name: str | None = None,
    smoothing: list[Smoothing] | None = None,
) -> Path:
    """Write `model` with `tokenizer` (an HF tokenizer or its folder) as a GGUF file; returns its path.

    `out` is the file, or an existing directory that gets `<name>.gguf`. The file appears atomically
    (written under a temporary sibling name, then renamed); an existing file is refused unless `force`.
    `outtype`: one of OUTTYPES (f16 by default, as llama.cpp's converter). `smoothing` is folded into the
    weights as `export_hf` does.
    """
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype {outtype!r} is not supported; choose one of {list(OUTTYPES)}")
    path = gguf_path(out, name)
    check_file_target(path, force)  # fail before any work
    plain, reasons = model.llama_compatible()
    if not plain:
        raise GGUFExportError(not_foldable_message(model.cfg, reasons))
    tok = as_tokenizer(tokenizer)
    if tok is None:
        raise GGUFExportError("GGUF needs the tokenizer (llama.cpp reads the vocabulary from the file); "
                              "pass one (osp export --tokenizer PATH)")
    cfg = model.cfg
    check_vocabulary(tok, cfg.vocab_size)
    file_type, _ = OUTTYPES[outtype]
    # before the file exists: a failure leaves nothing
    tensors = list(gguf_tensors(model, outtype, smoothing))
    with atomic_file(path, force) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            writer.add_name(name or "osp")
            writer.add_context_length(cfg.max_seq_len)
            writer.add_embedding_length(cfg.d_model)
            writer.add_block_count(cfg.n_layers)
            writer.add_feed_forward_length(cfg.ffn_hidden)
            writer.add_head_count(cfg.n_heads)
            writer.add_head_count_kv(cfg.n_kv_heads)
            writer.add_rope_dimension_count(cfg.head_dim)
            writer.add_rope_freq_base(float(cfg.rope_theta))
            writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
            writer.add_vocab_size(cfg.vocab_size)
            writer.add_file_type(int(file_type))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_tokenizer(writer, tok, cfg.vocab_size)
            for tensor_name, data, qtype in tensors:
                writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    log.info("osp export: wrote GGUF (%s) %s", outtype, path)
    return path


def not_foldable_message(cfg: ModelConfig, reasons: list[str]) -> str:
    """One line: which blocks and which config choices keep the model from being a plain Llama."""
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    choices = [f"{key}={getattr(cfg, key)!r}" for key in CUSTOM_BLOCK_KEYS
               if key in defaults and getattr(cfg, key) != defaults[key]]
    shown = ", ".join(reasons[:3]) + (f" ... ({len(reasons)} in all)" if len(reasons) > 3 else "")
    return (f"GGUF export needs a model that folds into Llama, but these blocks do not: {shown}"
            f"{' (' + ', '.join(choices) + ')' if choices else ''}; "
            "use --format hf instead (a Hugging Face folder with custom code, trust_remote_code=True)")


def gguf_path(out: str | os.PathLike, name: str | None = None) -> Path:
    """`out` itself, or `out/<name>.gguf` when `out` is an existing directory."""
    out = Path(out)
    return out / f"{name or 'model'}.gguf" if out.is_dir() else out


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Q/K rows from HF's rotate-half RoPE layout to GGML's interleaved one (convert_hf_to_gguf's permute).

    Within a head HF pairs row i with row i + d/2; GGML pairs rows 2i and 2i + 1. Row (j * d/2 + i) of a
    head moves to row (2i + j), so GGML rotates the same pairs by the same angles.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model: Transformer, outtype: str, smoothing: list[Smoothing] | None = None
                 ) -> Iterator[tuple[str, np.ndarray, QT]]:
    """(llama.cpp name, data as written, GGML type) of every weight, folded and with Q/K permuted."""
    cfg = model.cfg
    _, weight_type = OUTTYPES[outtype]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    for hf_name, tensor in hf_state_dict(model, dtype=torch.float32, tied=cfg.tie_embeddings,
                                               smoothing=smoothing).items():
        new_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if new_name is None:
            raise GGUFExportError(f"osp export: no llama.cpp name for {hf_name}; the GGUF export code lags "
                                  "behind the model")
        if hf_name.endswith("self_attn.q_proj.weight"):
            tensor = permute_qk(tensor, cfg.n_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            tensor = permute_qk(tensor, cfg.n_kv_heads)
        data = tensor.numpy()
        qtype = QT.F32 if data.ndim <= 1 or new_name.endswith("_norm.weight") else weight_type
        try:
            yield new_name, gguf.quants.quantize(data, qtype), qtype
        except gguf.QuantError:  # q8_0 needs rows in blocks of 32: the converter falls back to f16
            yield new_name, gguf.quants.quantize(data, QT.F16), QT.F16


def check_byte_level_bpe(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer.json of `tokenizer`, after checking that llama.cpp's gpt2 + "gpt-2" reproduces it.

    llama.cpp does not run the tokenizers library: it re-implements a few known pipelines. Anything
    else (another regex, a prefix space, a normalizer, WordPiece...) would load and tokenize differently.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model {model.get('type')!r} (need BPE)")
    if model.get("byte_fallback") or model.get("ignore_merges"):
        problems.append("byte_fallback/ignore_merges set")
    if spec.get("normalizer") is not None:
        problems.append(f"normalizer {spec['normalizer'].get('type')!r} (need none)")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        problems.append(f"pre-tokenizer {json.dumps(pre, sort_keys=True)} (need ByteLevel with the GPT-2 "
                        "regex and no prefix space)")
    if problems:
        raise GGUFExportError("GGUF export supports byte-level BPE tokenizers with the GPT-2 pre-tokenizer "
                              "(what llama.cpp calls gpt2 / gpt-2); this one has " + "; ".join(problems))
    return spec


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """Vocabulary (padded to the model's vocab_size, as the converter does), merges and special tokens."""
    spec = check_byte_level_bpe(tokenizer)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model's "
                              f"vocab_size is {vocab_size}")
    by_id = {i: token for token, i in vocab.items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # ids the model has beyond the tokenizer (vocab padded for speed)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if token not in added else
                         gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
    # tokenizers >= 0.20 stores merges as [a, b] pairs, older versions as "a b"; GGUF wants "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, key, None) is not None:
            add(int(getattr(tokenizer, key)))
    # Explicit, since llama.cpp's defaults differ by version: does encoding add BOS/EOS?
    plain, special = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bos is not None and special[:1] == [bos] and plain[:1] != [bos])
    writer.add_add_eos_token(eos is not None and special[-1:] == [eos] and plain[-1:] != [eos])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
