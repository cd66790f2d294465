"""Shape constraints of the rotation-based PTQ tools (QuaRot, SpinQuant) that consume exported checkpoints.

Both tools build their Hadamard matrices with `get_hadK(n)`: n must be 2^a, or 2^a * K for one of a few
hard-coded K. The K are tried in a fixed order and the *first* K dividing n must leave a power-of-two
quotient (otherwise the tool asserts), so the order matters and differs between the two tools.
"""

from __future__ import annotations

import warnings

from osp.model import ModelConfig

# `get_hadK` search orders: spcl/QuaRot:fake_quant/hadamard_utils.py and
# facebookresearch/SpinQuant:utils/hadamard_utils.py (OSP's evaluation harness uses SpinQuant's).
HADAMARD_K: dict[str, tuple[int, ...]] = {
    "QuaRot": (172, 156, 148, 140, 108, 60, 52, 36, 28, 40, 20, 12),
    "SpinQuant": (172, 156, 140, 108, 60, 52, 36, 28, 44, 40, 20, 12),
}


class LayoutWarning(UserWarning):
    """The exported model loads everywhere, but a rotation-based PTQ tool will reject its shapes."""


def is_pow2(n: int) -> bool:
    # Not imported from osp.quant.hadamard: that would load the whole quantization stack for one line.
    return n > 0 and n & (n - 1) == 0


def hadamard_k(n: int, order: tuple[int, ...]) -> int | None:
    """The K that `get_hadK(n)` picks with this search order (1: a power of two), or None where it asserts."""
    for k in order:
        if n % k == 0:
            return k if is_pow2(n // k) else None
    return 1 if is_pow2(n) else None


def _tools_rejecting(n: int, tools: tuple[str, ...] = tuple(HADAMARD_K)) -> list[str]:
    return [tool for tool in tools if hadamard_k(n, HADAMARD_K[tool]) is None]


def layout_problems(cfg: ModelConfig, tied: bool | None = None) -> list[str]:
    """Why QuaRot/SpinQuant would reject this model's shapes; empty when both accept it.

    `tied`: whether the exported head is tied to the embedding (default: the model's tie_embeddings).
    """
    problems: list[str] = []
    if not is_pow2(cfg.head_dim):
        problems.append(
            f"head_dim={cfg.head_dim} (d_model {cfg.d_model} / n_heads {cfg.n_heads}) is not a power of two: "
            "the Q/K Hadamard (KV-cache quantization) and the per-head R2 rotation of QuaRot and SpinQuant "
            "assert it"
        )
    sizes = ", ".join(str(k) for k in sorted(set(HADAMARD_K["QuaRot"]) | set(HADAMARD_K["SpinQuant"])))
    for what, n, role in (
        ("intermediate_size (model.ffn_hidden)", cfg.ffn_hidden, "the online down_proj Hadamard (R4)"),
        ("hidden_size (model.d_model)", cfg.d_model, "the residual rotation (R1)"),
    ):
        rejecting = _tools_rejecting(n)
        if rejecting:
            problems.append(
                f"{what}={n} is not supported by {' and '.join(rejecting)} for {role}: it must be 2^a or "
                f"2^a*K with K in {{{sizes}}} (the first listed K dividing it must leave a power of two; "
                "44 only in SpinQuant, 148 only in QuaRot); a power of two is best"
            )
    if _tools_rejecting(cfg.n_heads, ("QuaRot",)):
        problems.append(
            f"n_heads={cfg.n_heads} is not supported by QuaRot's online Hadamard across heads at the o_proj "
            "input (same 2^a*K rule as above)"
        )
    if cfg.tie_embeddings if tied is None else tied:
        problems.append(
            "tied embeddings: QuaRot assumes an untied lm_head (SpinQuant unties it by copying the embedding)"
        )
    return problems


def warn_layout(cfg: ModelConfig, tied: bool | None = None) -> list[str]:
    """Emit a LayoutWarning for every problem of `layout_problems(cfg, tied)`; returns them."""
    problems = layout_problems(cfg, tied)
    for problem in problems:
        warnings.warn(f"osp export: {problem}", LayoutWarning, stacklevel=3)
    return problems
