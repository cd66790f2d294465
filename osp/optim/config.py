"""OptimConfig: the `optim` config node as one frozen dataclass that validates itself and builds the
optimizer (`build`) and its LR schedule (`build_scheduler`).

Every error names the key and the allowed values (`optim.lr=-1.0 must be a number in [0.0, inf]`). The
dataclass defaults are AdamW's; configs/optim/<name>.yaml extends them (`optim/base`) with what it changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from osp.config_base import ConfigBase
from osp.errors import ConfigError
from osp.optim.groups import DECAYED_ROLES, ROLES, params_by_role
from osp.optim.muon import UPDATE_SCALES, Muon
from osp.optim.newton_schulz import AUTO
from osp.optim.root import ROOT
from osp.optim.schedules import DECAY_SHAPES, SCHEDULES, lr_multiplier
from osp.precision import DTYPES

OPTIMIZERS = ("adamw", "muon", "root")
MATRIX_OPTIMIZERS = {"muon": Muon, "root": ROOT}
# ROOT, shapes without a published entry: osp's fitted Newton-Schulz coefficients, or Muon's (ROOT's own code)
NS_FITS = ("fitted", "muon")
NS_DTYPES = (AUTO, *DTYPES)


@dataclass(frozen=True)
class OptimConfig(ConfigBase):
    """Validated optimizer settings. After construction `adamw_*` are filled from their fallbacks and
    `routing` maps every role to an algorithm (matrices, EmbProj included, to `name`; the rest to AdamW).
    The fields are the `optim` node's schema (osp.config_base); configs/optim/*.yaml set what differs."""

    SECTION: ClassVar[str] = "optim"

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # read by the trainer (gradient-norm clipping); None disables it
    schedule: str = "cosine"
    warmup_steps: int | float = 100  # an integer, or a fraction of the run in (0, 1)
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_dtype: str = AUTO
    update_scale: str = "moonlight"
    clip_quantile: float = 0.9
    clip_eps: float = 1e-9
    ns_fit: str = "fitted"
    adamw_lr: float | None = None
    adamw_betas: tuple[float, float] | None = None
    adamw_weight_decay: float | None = None
    routing: dict[str, str] | None = None
    decayed_roles: tuple[str, ...] = DECAYED_ROLES

    def __post_init__(self) -> None:
        for key, allowed in (("name", OPTIMIZERS), ("schedule", SCHEDULES), ("decay_shape", DECAY_SHAPES),
                             ("update_scale", UPDATE_SCALES), ("ns_dtype", NS_DTYPES), ("ns_fit", NS_FITS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"optim.{key}={getattr(self, key)!r} is not supported; "
                                  f"allowed: {', '.join(allowed)}")
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"optim.nesterov={self.nesterov!r} must be true or false")
        inf = float("inf")
        for key, low, high in (("lr", 0.0, inf), ("weight_decay", 0.0, inf), ("eps", 0.0, 1.0),
                               ("momentum", 0.0, 0.999999), ("clip_quantile", 0.0, 1.0),
                               ("clip_eps", 0.0, inf), ("min_lr_ratio", 0.0, 1.0),
                               ("decay_fraction", 0.0, 1.0)):
            self._set(key, _number(key, getattr(self, key), low, high))
        self._set("ns_steps", int(_number("ns_steps", self.ns_steps, 1, 100, integer=True)))
        if self.grad_clip is not None:
            self._set("grad_clip", _number("grad_clip", self.grad_clip, 0.0, inf))
        self._set("warmup_steps", _warmup(self.warmup_steps))
        self._set("betas", _betas("betas", self.betas))
        self._set("adamw_lr", self.lr if self.adamw_lr is None
                  else _number("adamw_lr", self.adamw_lr, 0.0, inf))
        self._set("adamw_weight_decay", self.weight_decay if self.adamw_weight_decay is None
                  else _number("adamw_weight_decay", self.adamw_weight_decay, 0.0, inf))
        self._set("adamw_betas", self.betas if self.adamw_betas is None
                  else _betas("adamw_betas", self.adamw_betas))
        self._set("routing", _routing(self.name, self.routing))
        self._set("decayed_roles", _roles("decayed_roles", self.decayed_roles))

    def _set(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)  # normalising a frozen dataclass while it is being built

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """One param group per non-empty role, with the algorithm and hyperparameters routing gives it."""
        groups = []
        for role, params in params_by_role(model).items():
            if not params:
                continue
            algorithm = self.routing[role]
            decayed = role in self.decayed_roles
            if algorithm == "adamw":
                group = {"lr": self.adamw_lr, "betas": self.adamw_betas, "eps": self.eps,
                         "weight_decay": self.adamw_weight_decay if decayed else 0.0}
            else:
                group = {"lr": self.lr, "weight_decay": self.weight_decay if decayed else 0.0,
                         "momentum": self.momentum, "nesterov": self.nesterov, "ns_steps": self.ns_steps,
                         "ns_dtype": self.ns_dtype, "update_scale": self.update_scale}
                if algorithm == "root":
                    group.update(clip_quantile=self.clip_quantile, clip_eps=self.clip_eps)
            groups.append({"params": params, "name": role, "algorithm": algorithm, **group})
        return groups

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """ONE optimizer for the model: torch AdamW, or Muon/ROOT with AdamW groups inside."""
        groups = self.param_groups(model)
        if self.name == "adamw":
            # Extra group keys (name, algorithm) are kept by torch optimizers and read by describe_groups.
            return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps,
                                     weight_decay=self.weight_decay)
        extra = {"fit_missing": self.ns_fit == "fitted"} if self.name == "root" else {}
        return MATRIX_OPTIMIZERS[self.name](groups, lr=self.lr, weight_decay=self.weight_decay, **extra)

    def reapply(self, optimizer: torch.optim.Optimizer, scheduler: LambdaLR, model: nn.Module) -> None:
        """Set this config's hyperparameters again on an optimizer and schedule restored from a checkpoint.

        torch's `load_state_dict` keeps the hyperparameters the optimizer was saved with, and LambdaLR's keeps
        the saved base lrs, so a change that `resume_allow` accepted (optim.lr, optim.weight_decay,
        optim.ns_dtype, ...) would be reported and then not applied. With an unchanged config this writes back
        the values already there: the resumed run stays bitwise the uninterrupted one.
        """
        fresh = self.param_groups(model)
        for group, settings in zip(optimizer.param_groups, fresh, strict=True):
            group.update({key: value for key, value in settings.items() if key != "params"})
            group["initial_lr"] = settings["lr"]
        scheduler.base_lrs = [settings["lr"] for settings in fresh]
        lrs = [base * factor(scheduler.last_epoch)
               for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs  # what get_last_lr() (the lr monitor) reads until the next step

    def build_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
        """LambdaLR over `total_steps` optimizer steps: a multiplier on each group's own lr."""
        return LambdaLR(optimizer, lr_multiplier(
            schedule=self.schedule, total_steps=int(total_steps), warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio, decay_fraction=self.decay_fraction, decay_shape=self.decay_shape))


def _number(key: str, v: Any, low: float, high: float, integer: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high
    if integer:
        ok = ok and float(v).is_integer()
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"optim.{key}={v!r} must be {kind} in [{low}, {high}]")
    return float(v)


def _warmup(v: Any) -> int | float:
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if number and 0.0 < v < 1.0 and isinstance(v, float):
        return v  # a fraction, resolved against the run's total_steps by lr_multiplier
    if number and v >= 0 and float(v).is_integer():
        return int(v)
    raise ConfigError(f"optim.warmup_steps={v!r} must be a non-negative integer or a fraction in (0, 1)")


def _betas(key: str, v: Any) -> tuple[float, float]:
    if (
        not isinstance(v, (list, tuple))
        or len(v) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in v)
    ):
        raise ConfigError(f"optim.{key}={v!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    return (float(v[0]), float(v[1]))


def _roles(key: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(r in ROLES for r in v):
        raise ConfigError(f"optim.{key}={v!r} must be a list of roles out of: {', '.join(ROLES)}")
    return tuple(dict.fromkeys(v))  # each role once, in the given order


def _routing(name: str, routing: Mapping[str, str] | None) -> dict[str, str]:
    """Role -> algorithm. Defaults: matrices (EmbProj included) to the named optimizer, the rest to AdamW."""
    resolved = {role: "adamw" for role in ROLES}
    resolved["matrix"] = name
    if routing is None:
        return resolved
    if not isinstance(routing, Mapping):
        raise ConfigError(f"optim.routing must be a mapping role -> algorithm, got {routing!r}")
    allowed = ("adamw",) if name == "adamw" else ("adamw", name)
    for role, algorithm in routing.items():
        if role not in ROLES:
            raise ConfigError(f"optim.routing has unknown role {role!r}; allowed roles: {', '.join(ROLES)}")
        if algorithm not in allowed:
            raise ConfigError(
                f"optim.routing.{role}={algorithm!r} is not supported with optim.name={name!r}; "
                f"allowed: {', '.join(allowed)}"
            )
        resolved[role] = algorithm
    return resolved
