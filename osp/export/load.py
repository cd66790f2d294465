"""Load an osp Transformer from anything osp writes: a Lightning checkpoint, a run dir, or an exported folder.

Exported folders come back with folded weights (norm="rms", emb_proj off): the same function as the trained
model, with the same hidden-state taps, so perplexity and kurtosis equal those of the trained model; W4A4
too, since the quantized view keeps embedding, EmbProj and head in full precision.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from osp.checkpoint_files import (
    DISTRIBUTED_META,
    latest_checkpoint,
    load_torch_file,
    resolve_checkpoint,
    run_dir_of,
)
from osp.errors import CheckpointError, ConfigError
from osp.model import ModelConfig, Transformer

from .hf import CUSTOM_BLOCK_KEYS, OSP_MODEL_TYPE
from .tokenizer import load_tokenizer


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", tokenizer: str | os.PathLike | None = None
) -> tuple[Transformer, Any]:
    """(Transformer in eval mode on `device`, tokenizer or None) from a .ckpt file, a run dir (its newest
    checkpoint, osp.checkpoint_files' rule, or its export when it kept no checkpoints), or an HF folder.

    The tokenizer comes from `tokenizer` (a folder) when given, else from the exported folder itself or
    from `<run_dir>/tokenizer/`; None when there is none.
    """
    path = Path(path)
    if (path.is_dir() and latest_checkpoint(path / "checkpoints") is None
            and (path / "export" / "config.json").is_file()):
        path = path / "export"  # a run that kept no checkpoints (the paper-table scales): its export
    if path.is_dir() and (path / "config.json").is_file():
        cfg, state = read_hf_folder(path)
        source, tokenizer_dir = path / "config.json", path
    else:
        checkpoint = resolve_checkpoint(path)
        cfg, state = read_lightning_checkpoint(checkpoint)
        source, tokenizer_dir = checkpoint, run_dir_of(checkpoint) / "tokenizer"
    model = build_model(cfg, state, source).to(device).eval()
    return model, load_tokenizer(Path(tokenizer) if tokenizer is not None else tokenizer_dir,
                                 required=tokenizer is not None)


def read_lightning_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """ModelConfig and Transformer state dict of a LanguageModelModule checkpoint (file or FSDP2 folder)."""
    if path.is_dir():
        return _read_distributed_checkpoint(path)
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict' mapping)")
    state = _strip_model_prefix(checkpoint["state_dict"], path)
    return _model_config(checkpoint, path), state


def read_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """ModelConfig and Transformer state dict of an exported folder (plain Llama or osp custom code)."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path}: cannot be read as JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    model_type = config.get("model_type")
    if model_type not in ("llama", OSP_MODEL_TYPE):
        raise CheckpointError(
            f"{config_path}: model_type {model_type!r} is neither 'llama' nor {OSP_MODEL_TYPE!r}; "
            "osp loads only folders in those layouts"
        )
    cfg = config_from_hf(config, config_path)
    state = {}
    for name, tensor in _read_safetensors(folder).items():
        state[name if name.startswith("lm_head.") else name.removeprefix("model.")] = tensor
    if cfg.tie_embeddings and "embed_tokens.weight" in state:
        # The tied head is not stored (or stored as a copy); the Transformer's state dict names it anyway.
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return cfg, state


def config_from_hf(config: dict[str, Any], source: Path) -> ModelConfig:
    """The osp ModelConfig of a Llama/osp config.json (norms as per-channel RMSNorm, EmbProj off)."""
    theta, rope_type = _rope(config)
    for key, value, expected in (
        ("hidden_act", config.get("hidden_act", "silu"), "silu"),
        ("attention_bias", bool(config.get("attention_bias", False)), False),
        ("mlp_bias", bool(config.get("mlp_bias", False)), False),
        ("rope_type", rope_type, "default"),
    ):
        if value != expected:
            raise CheckpointError(f"{source}: {key}={value!r} is not supported by osp (only {expected!r})")
    try:
        values: dict[str, Any] = dict(
            vocab_size=int(config["vocab_size"]),
            d_model=int(config["hidden_size"]),
            n_layers=int(config["num_hidden_layers"]),
            n_heads=int(config["num_attention_heads"]),
            n_kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
            ffn_hidden=int(config["intermediate_size"]),
            max_seq_len=int(config["max_position_embeddings"]),
            rope_theta=float(theta),
            norm="rms",
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            emb_proj=False,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            init_std=float(config.get("initializer_range", 0.02)),
        )
    except KeyError as err:
        raise CheckpointError(f"{source}: missing key {err.args[0]!r}") from err
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: bad value ({err})") from err
    head_dim = config.get("head_dim") or values["d_model"] // values["n_heads"]
    if head_dim * values["n_heads"] != values["d_model"]:
        raise CheckpointError(f"{source}: head_dim={head_dim} is not hidden_size / num_attention_heads; "
                              "osp needs head_dim = d_model / n_heads")
    if config.get("model_type") == OSP_MODEL_TYPE:
        values.update({key: config[key] for key in CUSTOM_BLOCK_KEYS if key in config})
    try:
        return ModelConfig(**values)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from err


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], source: Path) -> Transformer:
    """Transformer(cfg) with `state` loaded strictly; mismatches name the file and the tensors."""
    model = Transformer(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{name}: checkpoint {tuple(state[name].shape)} vs model {tuple(expected[name].shape)}"
              for name in expected if name in state and state[name].shape != expected[name].shape]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_few(shapes)}")
    if problems:
        raise CheckpointError(f"{source}: weights do not match the model config: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model


# Helpers ---------------------------------------------------------------------------------------------


def _torch_load(path: Path) -> Any:
    try:
        return load_torch_file(path)
    except ValueError as err:
        raise CheckpointError(str(err)) from err


def _model_config(checkpoint: dict[str, Any], path: Path) -> ModelConfig:
    values = ((checkpoint.get("osp") or {}).get("model_config")
              or (checkpoint.get("hyper_parameters") or {}).get("model"))
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: no model config (neither checkpoint['osp']['model_config'] nor "
                              "hyper_parameters['model']); not written by osp training")
    try:
        return ModelConfig.from_dict(values)
    except ConfigError as err:
        raise CheckpointError(f"{path}: bad model config ({err})") from err


def _strip_model_prefix(state_dict: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    state = {key.removeprefix("model."): value for key, value in state_dict.items()
             if key.startswith("model.")}
    if not state:
        raise CheckpointError(f"{path}: state_dict has no 'model.' keys (found {_few(sorted(state_dict))}); "
                              "not an osp LanguageModelModule checkpoint")
    return state


def _read_distributed_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Lightning ModelParallelStrategy (FSDP2) folder: DCP shards under "state_dict" plus meta.pt."""
    import torch.distributed.checkpoint as dcp

    meta_path = path / DISTRIBUTED_META
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: distributed checkpoint without {DISTRIBUTED_META}; "
                              "not written by Lightning")
    cfg = _model_config(_torch_load(meta_path), meta_path)
    # DCP loads into preallocated tensors, so the model's own state dict gives names and shapes.
    template = {f"model.{name}": tensor for name, tensor in Transformer(cfg).state_dict().items()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"state_dict": template}, checkpoint_id=str(path), no_dist=True)
    except Exception as err:  # DCP raises CheckpointException (and others) with the per-rank causes
        raise CheckpointError(f"{path}: cannot read the model weights of the distributed checkpoint "
                              f"({err})") from err
    return cfg, _strip_model_prefix(template, path)


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path}: not a safetensors index ({err})") from err
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(str(folder / name)))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{folder / name}: cannot be read as safetensors ({err})") from err
    return state


def _rope(config: dict[str, Any]) -> tuple[float, str]:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return theta, params.get("rope_type", params.get("type", "default"))


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")
