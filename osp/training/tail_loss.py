"""The FFN tail loss: a training-only term that keeps extreme entries out of the down-projection input.

In the spirit of TWEO (Liang et al., arXiv 2511.23225), which prevents outliers with a loss on activation
magnitudes instead of an architecture change. Here it acts where osp measures the W4A4 loss: the SwiGLU
output h that down_proj reads. An entry costs nothing up to `threshold` times its reference RMS and
grows quadratically beyond it:

    tail(h) = mean over entries of relu(|h| / r - threshold)^2

with r the RMS of the entry's token (`scale="token"`: what a per-token 4-bit grid sees, whose step is the
token's range / 15) or of the whole tensor (`scale="tensor"`: what one static per-tensor scale sees). r is
not detached, so the term cannot be escaped by rescaling h (down_proj would undo any scale). The loss the
optimizer sees is cross-entropy + weight x the mean of tail(h) over the blocks.

The term is estimated on every `token_stride`-th token of the batch (a different offset at every step, so
every position is covered), an unbiased estimate of the mean at 1/stride of the cost: elementwise work on the
SwiGLU output is memory-bound, and on all tokens it would add a quarter to a CPU step.

The term reaches the model through its nn.Linear seam (forward pre-hooks on every block's down_proj), so
the architecture and the export stay plain Llama.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from osp.config_base import ConfigBase
from osp.errors import ConfigError

SCALES = ("token", "tensor")


def tail_penalty(h: torch.Tensor, threshold: float, scale: str = "token", eps: float = 1e-12) -> torch.Tensor:
    """mean(relu(|h| / r - threshold)^2) over all entries of h (..., width), in fp32; r as the module says."""
    hf = h.float()
    square = hf.pow(2)
    mean_square = square.mean(-1, keepdim=True) if scale == "token" else square.mean()
    return F.relu(hf.abs() * torch.rsqrt(mean_square + eps) - threshold).pow(2).mean()


@dataclass(frozen=True)
class TailLossConfig(ConfigBase):
    """The `loss` config node (training-only loss terms): weight 0, the default, adds nothing and registers no
    hook. `osp train loss.ffn_tail_weight=1` turns the FFN tail loss on."""

    SECTION: ClassVar[str] = "loss"

    ffn_tail_weight: float = 0.0  # > 0: the tail loss's weight beside cross-entropy
    ffn_tail_threshold: float = 4.0  # entries cost nothing up to this many times their RMS
    ffn_tail_scale: str = "token"  # token | tensor: the RMS an entry is measured against
    ffn_tail_token_stride: int = 16  # estimated on every 16th token (a new offset at each step)

    def __post_init__(self) -> None:
        for key in ("ffn_tail_weight", "ffn_tail_threshold"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"loss.{key}={value!r} must be a number >= 0")
        stride = self.ffn_tail_token_stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ConfigError(f"loss.ffn_tail_token_stride={stride!r} must be a positive integer")
        if self.ffn_tail_scale not in SCALES:
            raise ConfigError(f"loss.ffn_tail_scale={self.ffn_tail_scale!r} is not allowed; choose one of "
                              f"{list(SCALES)}")


class TailLoss:
    """Collects tail(h) at every block's down_proj input during the training forward passes it is asked to.

        with tail_loss.collecting(step):
            logits = model(inputs)
        loss = cross_entropy + tail_loss.total()

    Forwards outside `collecting()` add nothing: validation, the outlier and W4A4 callbacks, and the
    recompute of activation checkpointing in backward.
    """

    def __init__(self, model: nn.Module, cfg: TailLossConfig) -> None:
        self.cfg = cfg
        self.terms: list[torch.Tensor] = []
        self.active = False
        self.offset = 0
        self.handles = [layer.mlp.down_proj.register_forward_pre_hook(self._collect)
                        for layer in model.layers]

    def _collect(self, module: nn.Module, args: tuple) -> None:
        if self.active:
            tokens = args[0].flatten(0, -2)[self.offset::self.cfg.ffn_tail_token_stride]
            self.terms.append(tail_penalty(tokens, self.cfg.ffn_tail_threshold, self.cfg.ffn_tail_scale))

    @contextmanager
    def collecting(self, step: int = 0) -> Iterator[None]:
        """Collect at the next forwards, on the tokens `step` mod stride, 2 x stride + that, ..."""
        self.terms, self.active = [], True
        self.offset = step % self.cfg.ffn_tail_token_stride
        try:
            yield
        finally:
            self.active = False

    def total(self) -> torch.Tensor:
        """weight x the mean over blocks of what the last `collecting()` forward collected."""
        if not self.terms:
            raise RuntimeError("TailLoss.total() without a forward pass under collecting()")
        return self.cfg.ffn_tail_weight * torch.stack(self.terms).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
