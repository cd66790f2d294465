"""ModelConfig: sizes and block choices, as plain values that Hydra can set."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from osp.config_base import ConfigBase
from osp.errors import ConfigError

# Allowed values of every string-valued block choice. Registries in the block modules must
# agree with these (a test checks it), so an error can list the choices without importing torch code.
CHOICES: dict[str, tuple[str, ...]] = {
    "norm": ("rms", "ss"),
    "attn_softmax": ("softmax", "clipped"),
    "attn_gate": ("none", "head_slice", "headwise", "elementwise"),
    "init": ("normal", "scaled"),
}


@dataclass
class ModelConfig(ConfigBase):
    """Sizes and block choices of a Llama-style decoder.

    Every field is a plain value so the config round-trips through YAML, JSON and `config.json`; the fields
    are the `model` node's schema (osp.config_base).
    """

    SECTION: ClassVar[str] = "model"

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    ffn_multiple_of: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm: str = "rms"
    norm_eps: float = 1e-6
    emb_proj: bool = False
    attn_softmax: str = "softmax"
    clip_gamma: float | None = None
    clip_zeta: float = 1.0
    clip_alpha: float | None = None
    attn_gate: str = "none"
    gate_init: float = 0.25
    gate_hidden: int = 0
    gated_norm_rank: int = 0
    pre_affine: bool = False
    tie_embeddings: bool = False
    smooth_swiglu: bool = False
    init: str = "scaled"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = _round_up(math.ceil(8 * self.d_model / 3), self.ffn_multiple_of)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key."""
        for key, allowed in CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(f"model.{key}={value!r} is not allowed; choose one of {list(allowed)}")
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden",
                    "max_seq_len"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"model.{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by "
                              f"model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE (d_model / n_heads)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}"
            )
        if self.norm_eps <= 0:
            raise ConfigError(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if self.gated_norm_rank < 0:
            raise ConfigError(f"model.gated_norm_rank must be >= 0 (0 = off), got {self.gated_norm_rank}")
        if not 0.0 < self.gate_init < 1.0:
            raise ConfigError(f"model.gate_init must lie in (0, 1), got {self.gate_init}")
        if self.gate_hidden < 0:
            raise ConfigError(f"model.gate_hidden must be >= 0 (0 = a linear gate), got {self.gate_hidden}")
        if self.gate_hidden > 0 and self.attn_gate != "head_slice":
            # Only the head-slice gate has an MLP form; a silently ignored setting would corrupt an A/B.
            raise ConfigError(
                f"model.gate_hidden={self.gate_hidden} applies only to model.attn_gate=head_slice, "
                f"got model.attn_gate={self.attn_gate!r}"
            )
        if self.attn_softmax == "clipped":
            if self.clip_gamma is not None and self.clip_alpha is not None:
                raise ConfigError("set either model.clip_gamma or model.clip_alpha, not both")
            if self.clip_gamma is None and self.clip_alpha is None:
                raise ConfigError("attn_softmax=clipped needs model.clip_gamma or model.clip_alpha")
            if self.clip_gamma is not None and self.clip_gamma > 0:
                raise ConfigError(f"model.clip_gamma must be <= 0, got {self.clip_gamma}")
            if self.clip_alpha is not None and self.clip_alpha < 0:
                raise ConfigError(
                    f"model.clip_alpha must be >= 0 (gamma = -alpha / max_seq_len), got {self.clip_alpha}"
                )
            if self.clip_zeta < 1:
                raise ConfigError(f"model.clip_zeta must be >= 1, got {self.clip_zeta}")
        else:
            stray = [k for k in ("clip_gamma", "clip_alpha") if getattr(self, k) is not None]
            stray += ["clip_zeta"] if self.clip_zeta != 1.0 else []
            if stray:
                raise ConfigError(
                    f"model.{', model.'.join(stray)} only apply with model.attn_softmax=clipped, "
                    f"got model.attn_softmax={self.attn_softmax!r} (set it to clipped, or drop them)"
                )
        if self.tie_embeddings and self.emb_proj:
            # EmbProj's merge gives E' = E R1^T and W' = W R2: two different matrices, so a tied
            # embedding/head cannot stay tied through export.
            raise ConfigError("model.tie_embeddings=true is incompatible with model.emb_proj=true")


def config_defaults() -> dict[str, Any]:
    """Every setting at its default (vocab_size aside: the data's tokenizer sets it), as the run record
    compares them."""
    return {f.name: f.default for f in fields(ModelConfig) if f.name != "vocab_size"}


def _round_up(x: int, multiple: int) -> int:
    return multiple * math.ceil(x / multiple)
