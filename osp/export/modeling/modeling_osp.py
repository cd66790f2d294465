"""Modeling code of osp models exported with blocks that do not fold into Llama.

Written into the export folder by `osp export`; load with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. Standalone on purpose (plain torch and
transformers, no osp import), so anyone can load the model without osp installed.

The architecture is Llama (RMSNorm, RoPE half-split, GQA, SwiGLU, untied head) plus the choices in
OspConfig: clipped softmax (on an explicit attention matrix, as fused attention kernels hard-code
softmax), attention output gates, GatedNorm and PreAffine. Parameter names are those of osp's
Transformer, so the exported state dict loads without renaming. EmbProj and SSNorm were folded at export.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_osp import OspConfig


def rms_normalize(x, eps):
    """x / sqrt(mean(x^2) + eps) over the last dim, in fp32, cast back."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class OspRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * rms_normalize(x, self.eps)


class OspPreAffine(nn.Module):
    """norm(lambda * x), lambda in R^d."""

    def __init__(self, norm, dim):
        super().__init__()
        self.norm = norm
        self.pre_scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.norm(self.pre_scale * x)


class OspGatedNorm(nn.Module):
    """y = norm(x); sigmoid(W_up silu(W_down y)) * y."""

    def __init__(self, norm, dim, rank):
        super().__init__()
        self.norm = norm
        self.gate_down = nn.Linear(dim, rank, bias=False)
        self.gate_up = nn.Linear(rank, dim, bias=False)

    def forward(self, x):
        y = self.norm(x)
        return torch.sigmoid(self.gate_up(F.silu(self.gate_down(y)))) * y


def build_norm(config):
    norm = OspRMSNorm(config.hidden_size, config.rms_norm_eps)
    if config.pre_affine:
        norm = OspPreAffine(norm, config.hidden_size)
    if config.gated_norm_rank > 0:
        norm = OspGatedNorm(norm, config.hidden_size, config.gated_norm_rank)
    return norm


def rope_cos_sin(position_ids, head_dim, theta):
    """cos/sin (B, 1, T, head_dim) of the half-split RoPE layout, in fp32, for integer positions (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device)
                                / head_dim))
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def head_gate(head_dim, hidden):
    """G_h of a head-slice gate: Linear(head_dim -> 1), or head_dim -> hidden -> ReLU -> 1."""
    if hidden == 0:
        return nn.Linear(head_dim, 1)
    return nn.Sequential(nn.Linear(head_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class OspAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads,
                                                        config.num_key_value_heads, config.head_dim)
        self.attn_softmax, self.attn_gate = config.attn_softmax, config.attn_gate
        self.clip_gamma, self.clip_zeta = config.clip_gamma, config.clip_zeta
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        if self.attn_gate == "head_slice":
            self.head_gates = nn.ModuleList(head_gate(hd, config.gate_hidden) for _ in range(self.n_heads))
        elif self.attn_gate in ("headwise", "elementwise"):
            width = self.n_heads * (hd if self.attn_gate == "elementwise" else 1)
            self.gate_proj = nn.Linear(d, width, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # Query head i reads key/value head i // (n_heads / n_kv_heads), as in Llama.
        n_rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if self.attn_softmax == "clipped":
            out = self._clipped(q, k, v, mask)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self._gate(out, x)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _clipped(self, q, k, v, mask):
        """clip((zeta - gamma) softmax(q k^T / sqrt(d)) + gamma, 0, 1) v, in fp32; masked keys get exactly
        0."""
        gamma, zeta = self.clip_gamma, self.clip_zeta
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        p = ((zeta - gamma) * torch.softmax(scores, dim=-1) + gamma).clamp(0.0, 1.0).masked_fill(~mask, 0.0)
        return (p @ v.float()).to(q.dtype)

    def _gate(self, out, x):
        """Scale each head's output (B, H, T, D) by a sigmoid gate computed from the normed block input x."""
        b, t, _ = x.shape
        if self.attn_gate == "head_slice":
            slices = x.view(b, t, self.n_heads, self.head_dim)
            logits = torch.cat([g(slices[:, :, i]) for i, g in enumerate(self.head_gates)], dim=-1)
            return out * torch.sigmoid(logits).transpose(1, 2).unsqueeze(-1)
        if self.attn_gate in ("headwise", "elementwise"):
            return out * torch.sigmoid(self.gate_proj(x)).view(b, t, self.n_heads, -1).transpose(1, 2)
        return out


class OspMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class OspDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = build_norm(config)
        self.self_attn = OspAttention(config, layer_idx)
        self.post_attention_layernorm = build_norm(config)
        self.mlp = OspMLP(config)

    def forward(self, h, cos, sin, mask, cache):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def _resolve_cache(cache, past_key_values, use_cache, config):
    """The Cache to read and extend, or None. Only a given cache is filled (generate() makes one)."""
    cache = cache if cache is not None else past_key_values
    if cache is not None and not hasattr(cache, "update"):
        raise ValueError("the cache must be a transformers Cache object (e.g. DynamicCache), not tuples")
    return cache if (use_cache if use_cache is not None else config.use_cache) else None


def _with_cache(output_class, cache, **fields):
    """A model output; transformers >= 5 names the cache field `cache`, earlier versions `past_key_values`."""
    name = "cache" if "cache" in getattr(output_class, "__dataclass_fields__", {}) else "past_key_values"
    return output_class(**fields, **{name: cache})


class OspPreTrainedModel(PreTrainedModel):
    config_class = OspConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["OspDecoderLayer"]

    def _init_weights(self, module):
        """Defaults of transformers (normal linears/embeddings, unit norms) plus osp's own parameters."""
        super()._init_weights(module)
        if isinstance(module, OspPreAffine):
            nn.init.ones_(module.pre_scale)
        elif isinstance(module, OspAttention) and module.attn_gate == "head_slice":
            for gate in module.head_gates:
                last = gate if isinstance(gate, nn.Linear) else gate[-1]
                p = self.config.gate_init
                nn.init.constant_(last.bias, math.log(p / (1.0 - p)))


class OspModel(OspPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(OspDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=None, cache=None,
                **kwargs):
        """hidden_states (when asked): embedding output, outputs of layers 1..L-1, final-norm output."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = _resolve_cache(cache, past_key_values, use_cache, self.config)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=h.device)[None].expand(b, t)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = self._mask(attention_mask, b, t, past, h.device)
        hidden_states = [h]
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache)
            if i < len(self.layers) - 1:
                hidden_states.append(h)
        h = self.norm(h)
        hidden_states.append(h)
        hidden_states = tuple(hidden_states) if output_hidden_states else None
        if return_dict is False:
            return tuple(x for x in (h, cache, hidden_states) if x is not None)
        return _with_cache(BaseModelOutputWithPast, cache, last_hidden_state=h, hidden_states=hidden_states)

    def _mask(self, attention_mask, b, t, past, device):
        """Boolean (B, 1, T, past + T) mask, True where a query may attend; None for plain causal softmax
        over a whole unpadded sequence (fused causal attention then handles it)."""
        padded = attention_mask is not None and not bool(attention_mask.all())
        if past == 0 and not padded and self.config.attn_softmax != "clipped":
            return None
        s = past + t
        mask = torch.arange(s, device=device)[None, :] <= torch.arange(past, s, device=device)[:, None]
        mask = mask[None, None].expand(b, 1, t, s)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[-1] != s:
                raise ValueError(f"attention_mask must be 2-D (batch, {s}) covering cached and new tokens, "
                                 f"got shape {tuple(attention_mask.shape)}")
            mask = mask & attention_mask.bool()[:, None, None, :]
        # A query with no visible key (a left-padding position) may see all keys instead: its output is
        # unused, and this keeps NaNs out of the softmax.
        return mask | ~mask.any(dim=-1, keepdim=True)


class OspForCausalLM(OspPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = OspModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, cache=None, **kwargs):
        """Logits (B, T, V); with `labels`, also the mean next-token cross-entropy (labels -100 ignored)."""
        cache = _resolve_cache(cache, past_key_values, use_cache, self.config)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=cache is not None,
                             output_hidden_states=output_hidden_states, return_dict=True, cache=cache)
        h = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            targets = labels[:, 1:].flatten().to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets, ignore_index=-100)
        if return_dict is False:
            return tuple(x for x in (loss, logits, cache, outputs.hidden_states) if x is not None)
        return _with_cache(CausalLMOutputWithPast, cache, loss=loss, logits=logits,
                           hidden_states=outputs.hidden_states)


__all__ = ["OspForCausalLM", "OspModel", "OspPreTrainedModel"]
