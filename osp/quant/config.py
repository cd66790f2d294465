"""QuantConfig: what the W4A4 view quantizes, and how (defaults = OSP's "RTN 4-4-4" protocol)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from osp.config_base import ConfigBase
from osp.errors import ConfigError, QuantConfigError

OFF = 16  # a bit width of 16 means "leave this tensor in full precision"
DEFAULT_ALPHA = 0.5  # the +smooth migration strength (osp.quant.smooth)

_PRESET = re.compile(r"^w(\d+)a(\d+)(?:kv(\d+))?((?:\+(?:smooth|had|gptq|static))*)$")

#: Named presets (any string matching the grammar of `QuantConfig.from_preset` also works).
PRESETS: dict[str, str] = {
    "fp": "no quantization (w16a16)",
    "w4a4kv4": "OSP's RTN 4-4-4: W4 per-channel MSE-clipped RTN, A4 per-token asymmetric, KV4 per head",
    "w4a4kv4+had": "w4a4kv4 plus an online Hadamard on the down-projection input (OSP's 'FFN Had')",
    "w4a4": "W4A4 without KV-cache quantization",
    "w4a16": "weight-only 4-bit (attributes error to the weights)",
    "w16a4": "activation-only 4-bit, K/V in full precision",
    "w16a4kv4": "activation-only 4-bit with KV4 (attributes error to the activations)",
    "w4a4kv4+gptq": "w4a4kv4 with GPTQ weights instead of RTN (needs calibration blocks)",
    "w4a4kv4+had+gptq": "OSP's '+ GPTQ' row: FFN Hadamard and GPTQ weights",
    "w8a8+static": "INT8 with static per-tensor activation scales calibrated offline (SmoothQuant/TensorRT's "
                   "static W8A8 without smoothing): one outlier channel sets the scale of the whole tensor",
    "w4a8+static": "4-bit weights, INT8 static per-tensor activations",
    "w4a4+static": "W4A4 with static per-tensor activation scales (needs calibration blocks)",
    "w4a4kv4+smooth": "w4a4kv4 with SmoothQuant per-channel scales on the down_proj and norm-fed inputs, "
                      "calibrated offline and folded into up_proj and the norm gains (free at inference)",
    "w4a4kv4+smooth+static": "w4a4kv4+smooth with static per-tensor activation scales",
}


@dataclass(frozen=True)
class QuantConfig(ConfigBase):
    """Fake-quantization settings of the W4A4 view. A bit width of 16 turns that quantizer off.

    Defaults follow the OSP/SpinQuant evaluation (W4A4KV4, RTN): weights 4-bit symmetric
    per output channel with a per-row MSE clip sweep; every linear input inside the blocks 4-bit asymmetric
    per token (o_proj input in groups of head_dim); K after RoPE and a Hadamard over head_dim, V per head.
    """

    SECTION: ClassVar[str] = "quant"
    ERROR: ClassVar[type[ConfigError]] = QuantConfigError

    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 4
    # Weights: symmetric per output channel, grid [-2^(b-1), 2^(b-1)-1], scale = p * absmax / (2^(b-1)-1).
    w_mse: bool = True  # per-row sweep of the clip ratio p (else p = 1)
    w_mse_grid: int = 100  # p = 1 - i / grid ...
    w_mse_maxshrink: float = 0.8  # ... for i < maxshrink * grid
    w_mse_norm: float = 2.4  # error of a candidate: sum |w_hat - w|^norm
    w_round_bf16: bool = True  # quantize a bf16 copy of the weights (what a bf16 deployment would hold)
    w_method: str = "rtn"  # "rtn" | "gptq"
    gptq_blocksize: int = 128
    gptq_percdamp: float = 0.01
    gptq_act_order: bool = False
    # Activations (inputs of every nn.Linear inside the blocks): dynamic, per token ...
    # ... or static: one symmetric scale per tensor, clip * absmax over calibration text
    a_static: bool = False
    a_sym: bool = False
    a_clip: float = 1.0
    a_group_size: int | None = None  # None: one scale per token over the full row
    o_proj_head_groups: bool = True  # o_proj input in groups of head_dim, as SpinQuant/OSP
    # KV cache: per token and head; K after RoPE.
    kv_sym: bool = False
    kv_clip: float = 1.0
    k_hadamard: bool = True  # Hadamard over head_dim on Q and K before K is quantized (OSP does this)
    # Rotations.
    down_hadamard: bool = False  # online Hadamard on the down_proj input, folded into its weight
    # Smoothing (osp.quant.smooth): per-channel scales of the foldable inputs, max|x|^alpha / max|W|^(1-alpha)
    # calibrated offline; None: off (a model.smooth_swiglu model still applies the down_proj scale it
    # trained).
    smooth_alpha: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise QuantConfigError naming the first bad field."""
        for key in ("w_bits", "a_bits", "kv_bits"):
            bits = getattr(self, key)
            if not (2 <= bits <= 8 or bits == OFF):
                raise QuantConfigError(f"quant.{key}={bits!r} must be in 2..8, or 16 for full precision")
        if self.w_method not in ("rtn", "gptq"):
            raise QuantConfigError(f"quant.w_method={self.w_method!r}; choose 'rtn' or 'gptq'")
        if self.w_method == "gptq" and self.w_bits == OFF:
            raise QuantConfigError("quant.w_method='gptq' needs quantized weights (w_bits < 16)")
        if self.w_mse_grid <= 0 or not 0.0 < self.w_mse_maxshrink < 1.0 or self.w_mse_norm <= 0:
            raise QuantConfigError(
                "quant.w_mse_grid > 0, 0 < quant.w_mse_maxshrink < 1 and quant.w_mse_norm > 0"
            )
        for key in ("a_clip", "kv_clip"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise QuantConfigError(f"quant.{key}={getattr(self, key)!r} must lie in (0, 1]")
        if self.a_group_size is not None and self.a_group_size <= 0:
            raise QuantConfigError(f"quant.a_group_size={self.a_group_size!r} must be positive or null")
        if self.a_static and self.a_bits == OFF:
            raise QuantConfigError("quant.a_static needs quantized activations (a_bits < 16)")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise QuantConfigError(f"quant.smooth_alpha={self.smooth_alpha!r} must lie in [0, 1] "
                                   "(or null: off)")
        if self.gptq_blocksize <= 0 or self.gptq_percdamp < 0:
            raise QuantConfigError("quant.gptq_blocksize must be > 0 and quant.gptq_percdamp >= 0")

    @property
    def is_identity(self) -> bool:
        """True when nothing is quantized, rotated or smoothed (the view would equal the fp model)."""
        return (self.w_bits == OFF and self.a_bits == OFF and self.kv_bits == OFF and not self.down_hadamard
                and self.smooth_alpha is None)

    @property
    def needs_calibration(self) -> bool:
        """True when the view needs calibration blocks (GPTQ weights, static activation scales)."""
        return self.w_method == "gptq" or self.a_static or self.smooth_alpha is not None

    @property
    def name(self) -> str:
        """Preset-style name: w{W}a{A}[kv{KV}][+smooth][+had][+gptq][+static] (other fields are not
        encoded)."""
        if self.is_identity:
            return "fp"
        out = f"w{self.w_bits}a{self.a_bits}" + (f"kv{self.kv_bits}" if self.kv_bits != OFF else "")
        return (out + ("+smooth" if self.smooth_alpha is not None else "")
                + ("+had" if self.down_hadamard else "") + ("+gptq" if self.w_method == "gptq" else "")
                + ("+static" if self.a_static else ""))

    @classmethod
    def from_preset(cls, preset: str = "w4a4kv4", **overrides: Any) -> QuantConfig:
        """Parse `w{W}a{A}[kv{KV}][+smooth][+had][+gptq][+static]` (or "fp"), then apply field overrides.

        "w4a4kv4" is the OSP row; "w4a16" weight-only; "w16a4" activation-only (K/V kept full precision).
        """
        if preset in ("fp", "w16a16", "w16a16kv16"):
            fields_: dict[str, Any] = {"w_bits": OFF, "a_bits": OFF, "kv_bits": OFF}
        else:
            match = _PRESET.match(preset.strip().lower())
            if match is None:
                raise QuantConfigError(
                    f"unknown quant preset {preset!r}; "
                    "use w<bits>a<bits>[kv<bits>][+smooth][+had][+gptq][+static], "
                    f"e.g. {sorted(PRESETS)}"
                )
            w, a, kv, flags = match.groups()
            tags = [t for t in flags.split("+") if t]
            fields_ = {
                "w_bits": int(w),
                "a_bits": int(a),
                "kv_bits": int(kv) if kv is not None else OFF,
                "down_hadamard": "had" in tags,
                "w_method": "gptq" if "gptq" in tags else "rtn",
                "a_static": "static" in tags,
                "smooth_alpha": DEFAULT_ALPHA if "smooth" in tags else None,
            }
        fields_.update(overrides)
        return cls.from_dict(fields_)

    @classmethod
    def resolve(cls, cfg: QuantConfig | str | dict[str, Any]) -> QuantConfig:
        """Accept a QuantConfig, a preset string or a dict of fields (optionally with a 'preset' key)."""
        if isinstance(cfg, QuantConfig):
            return cfg
        if isinstance(cfg, str):
            return cls.from_preset(cfg)
        values = {k: v for k, v in dict(cfg).items() if k != "_target_"}
        preset = values.pop("preset", None)
        return cls.from_preset(preset, **values) if preset is not None else cls.from_dict(values)
