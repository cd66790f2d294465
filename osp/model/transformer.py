"""Block and Transformer: a Llama-style pre-norm decoder assembled from ModelConfig."""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import build_attention, rope_tables
from .config import ModelConfig
from .embedding import EmbProj
from .mlp import SwiGLU
from .norms import build_norm

ROLES = ("embedding", "head", "matrix", "gain", "bias")


class Block(nn.Module):
    """Pre-norm decoder block: h + attn(norm(h)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = build_norm(cfg)
        self.self_attn = build_attention(cfg)
        self.post_attention_layernorm = build_norm(cfg)
        self.mlp = SwiGLU(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """Decoder-only language model. `Transformer(cfg)(input_ids)` returns logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.emb_proj_in = EmbProj(cfg.d_model) if cfg.emb_proj else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = build_norm(cfg)
        self.emb_proj_out = EmbProj(cfg.d_model) if cfg.emb_proj else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for the embedding, the head and every linear map (attention, FFN, gates,
        GatedNorm); 'scaled' also divides the residual-stream output projections by sqrt(2 L) (GPT-2), so
        the residual variance does not grow with depth. Linears marked `osp_custom_init` (EmbProj:
        orthogonal) keep their own init; norms initialise themselves; `reset_gate_parameters()` (gate
        biases) runs last, on every module that has it."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.init == "scaled" else std
        nn.init.normal_(self.embed_tokens.weight, 0.0, std)
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear) or getattr(module, "osp_custom_init", False):
                continue
            if module.weight is self.embed_tokens.weight:  # tied head: already initialised
                continue
            is_output = name.endswith(("self_attn.o_proj", "mlp.down_proj"))
            nn.init.normal_(module.weight, 0.0, out_std if is_output else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if hasattr(module, "reset_gate_parameters"):
                module.reset_gate_parameters()

    def forward(
        self, input_ids: torch.Tensor, output_hidden_states: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        t = input_ids.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        h = self.embed_tokens(input_ids)
        if self.emb_proj_in is not None:
            h = self.emb_proj_in(h)
        taps = [h]
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin)
            if i < len(self.layers) - 1:
                taps.append(h)
        h = self.norm(h)
        taps.append(h)
        if self.emb_proj_out is not None:
            h = self.emb_proj_out(h)
        logits = self.lm_head(h)
        return (logits, taps) if output_hidden_states else logits

    def parameter_roles(self) -> dict[str, str]:
        """Parameter name -> role, the input of optimizer routing.

        embedding: token embedding; head: LM head; matrix: every other weight of an nn.Linear
        (attention, FFN, EmbProj, gates); gain: norm scales and other learned scalars/vectors; bias: biases.
        """
        roles: dict[str, str] = {}
        for module_name, module in self.named_modules():
            for pname, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{pname}" if module_name else pname
                if module is self.embed_tokens:
                    roles[full] = "embedding"
                elif module is self.lm_head:
                    roles.setdefault(full, "head")
                elif isinstance(module, nn.Linear):
                    roles[full] = "bias" if pname == "bias" else "matrix"
                else:
                    roles[full] = "bias" if pname.endswith("bias") else "gain"
        # named_parameters() de-duplicates tied weights; keep exactly those names.
        return {name: roles[name] for name, _ in self.named_parameters()}

    def llama_compatible(self) -> tuple[bool, list[str]]:
        """Whether every block folds exactly into a plain HF Llama at export, and the names of those that
        don't. Blocks declare it with the class attribute `folds_into_llama`; modules without it (containers,
        plain linears) are neutral. Export writes a Llama folder only when this is (True, [])."""
        blockers = [name for name, m in self.named_modules() if getattr(m, "folds_into_llama", True) is False]
        return not blockers, blockers

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per matmul parameter plus causal attention scores and values
        (12 L T d halved for causality is the usual convention; we keep the full 12 L T d as PaLM does)."""
        matmul_params = self.num_params(exclude_embedding=True)
        if self.cfg.tie_embeddings:
            matmul_params += self.embed_tokens.weight.numel()
        return 6.0 * matmul_params + 12.0 * self.cfg.n_layers * seq_len * self.cfg.d_model
