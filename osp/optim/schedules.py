"""Learning-rate schedules as LambdaLR multipliers: warmup + cosine, warmup-stable-decay, constant.

Every schedule is a multiplier on each param group's own base lr, so one LambdaLR scales AdamW
and Muon/ROOT groups together while each keeps its own lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from osp.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "1-sqrt")


@dataclass
class LRMultiplier:
    """lr multiplier at optimizer step `step` (0-based).

    Warmup is linear, (step + 1) / warmup_steps, so the first step already learns. After warmup:
    - cosine: from 1 down to min_lr_ratio at total_steps;
    - wsd: 1 until the last `decay_fraction` of total_steps, then linear or 1-sqrt decay to min_lr_ratio;
    - constant: 1.
    Steps past total_steps keep the final value. A plain class (not a closure) so that LambdaLR's
    state_dict records the schedule's parameters in checkpoints.
    """

    schedule: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    decay_shape: str = "linear"

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "cosine":
            start = self.warmup_steps
            progress = min(1.0, (step - start) / max(1, self.total_steps - start))
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        # wsd: the decay phase never starts before warmup ends.
        decay_steps = max(1, round(self.decay_fraction * self.total_steps))
        start = max(self.warmup_steps, self.total_steps - decay_steps)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, self.total_steps - start))
        if self.decay_shape == "1-sqrt":
            progress = math.sqrt(progress)
        return 1.0 - (1.0 - self.min_lr_ratio) * progress


def lr_multiplier(
    schedule: str,
    total_steps: int,
    warmup_steps: int | float = 0,
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
) -> LRMultiplier:
    """Validated LRMultiplier; a float warmup_steps in (0, 1) is a fraction of total_steps."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={schedule!r} is not supported; allowed: {', '.join(SCHEDULES)}")
    if decay_shape not in DECAY_SHAPES:
        raise ConfigError(
            f"optim.decay_shape={decay_shape!r} is not supported; allowed: {', '.join(DECAY_SHAPES)}"
        )
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"total_steps must be a positive integer, got {total_steps!r}")
    if isinstance(warmup_steps, float) and 0.0 < warmup_steps < 1.0:
        warmup_steps = round(warmup_steps * total_steps)
    if warmup_steps != int(warmup_steps) or warmup_steps < 0:
        raise ConfigError(
            f"optim.warmup_steps must be a non-negative integer or a fraction in (0, 1), got {warmup_steps!r}"
        )
    warmup_steps = int(warmup_steps)
    if warmup_steps >= total_steps:
        raise ConfigError(
            f"optim.warmup_steps={warmup_steps} must be smaller than the run's total_steps={total_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    if not 0.0 < decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction must be in (0, 1], got {decay_fraction!r}")
    return LRMultiplier(
        schedule=schedule,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        min_lr_ratio=float(min_lr_ratio),
        decay_fraction=float(decay_fraction),
        decay_shape=decay_shape,
    )
