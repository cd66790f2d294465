"""Configuration of osp models exported with custom blocks (written by `osp export`, loaded with
`AutoConfig.from_pretrained(path, trust_remote_code=True)`).

Standalone on purpose: it needs only `transformers`, not osp. The fields are Llama's plus the block
choices that do not fold into Llama (clipped softmax, attention output gates, GatedNorm, PreAffine).
"""

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5 spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig

ATTN_SOFTMAX = ("softmax", "clipped")
ATTN_GATES = ("none", "head_slice", "headwise", "elementwise")


class OspConfig(PreTrainedConfig):
    """Llama-style decoder sizes plus osp block choices.

    attn_softmax: "softmax", or "clipped": clip((clip_zeta - clip_gamma) softmax + clip_gamma, 0, 1).
    attn_gate: "none"; "head_slice" (per head, sigmoid(G_h(x_h)) from the head's slice of the normed
      input; G_h linear, or an MLP with gate_hidden units); "headwise" / "elementwise" (sigmoid(x W_g),
      one gate per head / per channel). gate_init: initial gate value of head_slice gates (bias logit).
    gated_norm_rank: r > 0 gates every norm output by sigmoid(W_up silu(W_down y)) (GatedNorm).
    pre_affine: every norm normalises lambda * x with a learned lambda in R^d (PreAffine).
    """

    model_type = "osp"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        attn_softmax: str = "softmax",
        clip_gamma: float | None = None,
        clip_zeta: float = 1.0,
        attn_gate: str = "none",
        gate_init: float = 0.25,
        gate_hidden: int = 0,
        gated_norm_rank: int = 0,
        pre_affine: bool = False,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if attn_softmax not in ATTN_SOFTMAX:
            raise ValueError(f"attn_softmax={attn_softmax!r} is not one of {ATTN_SOFTMAX}")
        if attn_gate not in ATTN_GATES:
            raise ValueError(f"attn_gate={attn_gate!r} is not one of {ATTN_GATES}")
        if attn_softmax == "clipped" and clip_gamma is None:
            raise ValueError("attn_softmax='clipped' needs clip_gamma")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r}: osp models use silu (SwiGLU)")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        if self.head_dim * num_attention_heads != hidden_size:
            raise ValueError(f"head_dim={self.head_dim} must equal hidden_size / num_attention_heads")
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        # A config.json written by a newer transformers may carry the theta only in rope_parameters.
        rope_parameters = kwargs.pop("rope_parameters", None) or {}
        self.rope_theta = float(rope_parameters.get("rope_theta", rope_theta))
        self.attn_softmax = attn_softmax
        self.clip_gamma = clip_gamma
        self.clip_zeta = clip_zeta
        self.attn_gate = attn_gate
        self.gate_init = gate_init
        self.gate_hidden = gate_hidden
        self.gated_norm_rank = gated_norm_rank
        self.pre_affine = pre_affine
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
