"""Hugging Face export: an osp Transformer -> a folder that `AutoModelForCausalLM.from_pretrained` loads.

Two layouts, chosen by the model itself (`Transformer.llama_compatible()`):
- every block folds into Llama (RMSNorm/SSNorm, EmbProj): a plain `LlamaForCausalLM` folder, loadable by
  any tool (QuaRot, SpinQuant, vLLM, GPTQ) without osp;
- otherwise (clipped softmax, attention gates, GatedNorm, PreAffine): the same weights plus self-contained
  modeling code (`modeling_osp.py`, `configuration_osp.py`), loaded with `trust_remote_code=True`.
Foldable blocks are folded in both layouts (EmbProj merged into embedding and head, SSNorm scalars written
as RMSNorm weight vectors), so the weights are always in Llama form and only the extra blocks differ.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

import osp
from osp.data.tokenizer import save_tokenizer
from osp.errors import ExportError
from osp.model import ModelConfig, Transformer, merge_emb_proj
from osp.precision import DTYPES
from osp.quant.smooth import Smoothing, fold_into_state, trained_smoothing

from .layout import warn_layout
from .targets import atomic_directory, check_target
from .tokenizer import as_tokenizer, check_vocabulary

log = logging.getLogger(__name__)

MODELING_DIR = Path(__file__).resolve().parent / "modeling"
CUSTOM_CODE_FILES = ("configuration_osp.py", "modeling_osp.py")
OSP_MODEL_TYPE = "osp"
OSP_ARCHITECTURE = "OspForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_osp.OspConfig",
    "AutoModel": "modeling_osp.OspModel",
    "AutoModelForCausalLM": "modeling_osp.OspForCausalLM",
}
# Block choices that modeling_osp.py implements; written into config.json under these names.
CUSTOM_BLOCK_KEYS = ("attn_softmax", "clip_gamma", "clip_zeta", "attn_gate", "gate_init", "gate_hidden",
                     "gated_norm_rank", "pre_affine")


def export_hf(
    model: Transformer,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    force: bool = False,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    smoothing: list[Smoothing] | None = None,
) -> Path:
    """Write `model` (and `tokenizer`: an HF tokenizer object or a folder) as a Hugging Face folder.

    Writes config.json, generation_config.json, safetensors weights (sharded with an index above
    `max_shard_size`), tokenizer files and, for non-Llama blocks, the custom modeling code. `dtype`
    casts the weights (default: as trained); `smoothing` (osp.quant.w4a4.smoothing_of of a +smooth preset) is
    folded into the weights (a smooth_swiglu model's own is folded by default). The folder appears atomically;
    a non-empty `out_dir` is refused unless `force`, which replaces it. Warns (LayoutWarning) when
    QuaRot/SpinQuant would reject the shapes. Returns the folder.
    """
    out_dir = Path(out_dir)
    check_target(out_dir, force)  # fail before any work
    cfg = model.cfg
    tok = as_tokenizer(tokenizer)
    check_vocabulary(tok, cfg.vocab_size)
    plain, reasons = model.llama_compatible()
    # The custom code always has its own head: simpler code, same function, one vocab x d copy more.
    tied = plain and cfg.tie_embeddings
    warn_layout(cfg, tied)
    tensors = hf_state_dict(model, _as_dtype(dtype), tied=tied, smoothing=smoothing)
    weight_dtype = tensors["model.embed_tokens.weight"].dtype
    config = (llama_config(model, weight_dtype, tok) if plain
              else osp_config(model, weight_dtype, tok, reasons))
    if smoothing:
        config["osp"]["folded"].append(f"+smooth per-channel scales of "
                                       f"{sum(len(s.readers) for s in smoothing)} linear inputs folded into "
                                       "up_proj, the norm gains and their readers")
    check_loadable(config, tensors)
    with atomic_directory(out_dir, force=force) as tmp:
        _write_json(tmp / "config.json", config)
        _write_generation_config(tmp, config)
        write_weights(tmp, tensors, max_shard_size)
        if not plain:
            for name in CUSTOM_CODE_FILES:
                shutil.copyfile(MODELING_DIR / name, tmp / name)
        if tok is not None:
            save_tokenizer(tok, tmp, model_max_length=cfg.max_seq_len)
    log.info("osp export: wrote %s folder %s", "Llama" if plain else "osp custom-code", out_dir)
    return out_dir


@torch.no_grad()
def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None, tied: bool | None = None,
                  smoothing: list[Smoothing] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights in Hugging Face Llama names, with foldable blocks folded.

    Parameters keep osp's names (which are HF Llama's) under the `model.` prefix, except `lm_head`.
    Every norm contributes its `llama_weight()` (an SSNorm scalar becomes g * 1_d); EmbProj is merged
    into the embedding and head (exact up to rounding: done in fp64), and per-channel smoothing (`smoothing`,
    default: a smooth_swiglu model's own) into up_proj, the norm gains and their readers. With `tied`
    (default: the model's tie_embeddings) the head is left out, since `tie_word_embeddings` restores it. Other
    parameters (gates, GatedNorm, PreAffine) are copied as is.
    """
    state: dict[str, torch.Tensor] = dict(model.state_dict())
    for name, module in model.named_modules():
        if hasattr(module, "llama_weight"):
            state[f"{name}.weight"] = module.llama_weight()
    # Per-channel smoothing folds into the weights (osp.quant.smooth): a +smooth calibration when given, else
    # what a smooth_swiglu model tracked in training; its running max is training state, not a weight.
    list(fold_into_state(state, trained_smoothing(model) if smoothing is None else smoothing))
    for key in [k for k in state if k.endswith(".mlp.output_absmax")]:
        del state[key]
    if model.emb_proj_in is not None:
        embedding, head = merge_emb_proj(model.embed_tokens.weight, model.lm_head.weight,
                                         model.emb_proj_in.weight, model.emb_proj_out.weight)
        state["embed_tokens.weight"], state["lm_head.weight"] = embedding, head
        for key in [k for k in state if k.startswith(("emb_proj_in.", "emb_proj_out."))]:
            del state[key]
    if model.cfg.tie_embeddings if tied is None else tied:
        del state["lm_head.weight"]
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
        if tensor.data_ptr() in seen:  # a kept tied head: safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[name if name.startswith("lm_head.") else f"model.{name}"] = tensor
    return out


def check_loadable(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Raise unless the class that will load the folder has exactly these tensor names and shapes.

    transformers fills a missing weight with a random init and only reports it, so a block that osp gains
    without the export learning about it would otherwise produce a folder that loads and is wrong.
    The class is built on the meta device: no memory, no init work.
    """
    if config["model_type"] == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model_class, config_class = LlamaForCausalLM, LlamaConfig
    else:
        from .modeling.configuration_osp import OspConfig
        from .modeling.modeling_osp import OspForCausalLM

        model_class, config_class = OspForCausalLM, OspConfig
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "auto_map")}
    with torch.device("meta"):
        target = model_class(config_class(**fields))
    expected = {name: tuple(t.shape) for name, t in target.state_dict().items()}
    if config["tie_word_embeddings"]:
        expected.pop("lm_head.weight", None)
    written = {name: tuple(t.shape) for name, t in tensors.items()}
    if written != expected:
        missing = sorted(set(expected) - set(written))
        extra = sorted(set(written) - set(expected))
        shapes = sorted(k for k in set(written) & set(expected) if written[k] != expected[k])
        raise RuntimeError(
            f"osp export: the weights do not fit {model_class.__name__}: not exported {missing[:5]}, "
            f"unknown to it {extra[:5]}, other shapes {shapes[:5]}; the export code lags behind the model"
        )


def llama_config(model: Transformer, dtype: torch.dtype, tokenizer: Any = None) -> dict[str, Any]:
    """config.json of the plain `LlamaForCausalLM` equivalent to `model` (after folding)."""
    cfg = model.cfg
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_llama_fields(cfg, dtype, tokenizer),
        "osp": _provenance(model),
    }


def osp_config(model: Transformer, dtype: torch.dtype, tokenizer: Any, reasons: list[str]) -> dict[str, Any]:
    """config.json of the custom-code model: the Llama fields, the non-folding block choices and auto_map."""
    cfg = model.cfg
    fields = _llama_fields(cfg, dtype, tokenizer)
    del fields["rope_parameters"]  # OspConfig keeps one spelling, rope_theta
    blocks = {key: getattr(cfg, key) for key in CUSTOM_BLOCK_KEYS}
    # gamma as the attention block resolved it (clip_gamma, or -clip_alpha / max_seq_len).
    blocks["clip_gamma"] = getattr(model.layers[0].self_attn.core, "gamma", None)
    return {
        "architectures": [OSP_ARCHITECTURE],
        "model_type": OSP_MODEL_TYPE,
        "auto_map": dict(AUTO_MAP),
        **fields,
        "tie_word_embeddings": False,  # export_hf writes the head even for a tied model
        **blocks,
        "osp": {**_provenance(model), "not_llama": list(reasons)},
    }


def _llama_fields(cfg: ModelConfig, dtype: torch.dtype, tokenizer: Any) -> dict[str, Any]:
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers >= 5 reads rope_parameters, the versions pinned by QuaRot/SpinQuant
        # (4.38-4.47) read rope_theta and would silently fall back to 10000 without it.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "use_cache": True,
        **_special_token_ids(tokenizer),
        # Same reason as rope: `dtype` for transformers >= 4.56, `torch_dtype` before.
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def _provenance(model: Transformer) -> dict[str, Any]:
    """What was trained and what export changed, for people and for `osp eval` reports."""
    cfg = model.cfg
    folded = []
    if model.emb_proj_in is not None:
        folded.append("emb_proj merged into embed_tokens and lm_head")
    if cfg.norm == "ss":
        folded.append("SSNorm scalars written as RMSNorm weight vectors")
    if cfg.smooth_swiglu:
        folded.append("Smooth-SwiGLU per-channel scales folded into up_proj rows and down_proj columns")
    return {"version": osp.__version__, "trained_config": cfg.to_dict(), "folded": folded}


def _special_token_ids(tokenizer: Any) -> dict[str, Any]:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {key: getattr(tokenizer, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def write_weights(out_dir: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json when large."""
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        # "format": "pt" is what transformers checks before trusting a safetensors file as PyTorch weights.
        save_file({name: tensors[name] for name in names}, str(out_dir / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        _write_json(out_dir / "model.safetensors.index.json", index)


def _write_generation_config(out_dir: Path, config: dict[str, Any]) -> None:
    from transformers import GenerationConfig

    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    ids = {key: config[key] for key in keys if config[key] is not None}
    GenerationConfig(**ids).save_pretrained(str(out_dir))


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not allowed; choose one of {list(DTYPES)} "
                          "(or None: as trained)")
    return DTYPES[dtype]
