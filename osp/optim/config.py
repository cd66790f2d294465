"""The `optim` config node: defaults, and validation with messages that name the key and the allowed values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from osp.optim.schedules import DECAY_SHAPES, SCHEDULES

OPTIMIZERS = ("adamw", "muon", "root")
ROLES = ("embedding", "head", "matrix", "gain", "bias")
UPDATE_SCALES = ("moonlight", "keller")
# ROOT, shapes without a published entry: osp's fitted Newton-Schulz coefficients, or Muon's (ROOT's own code)
NS_FITS = ("fitted", "muon")
NS_DTYPES = ("bf16", "fp32", "fp16", "bfloat16", "float32", "float16")

# Defaults of every key; a config file only needs the keys it changes.
DEFAULTS: dict[str, Any] = {
    "name": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.1,
    "betas": (0.9, 0.95),
    "eps": 1e-8,
    "grad_clip": 1.0,
    "schedule": "cosine",
    "warmup_steps": 0,
    "min_lr_ratio": 0.1,
    "decay_fraction": 0.2,
    "decay_shape": "linear",
    "momentum": 0.95,
    "nesterov": True,
    "ns_steps": 5,
    "ns_dtype": "bf16",
    "update_scale": "moonlight",
    "clip_quantile": 0.9,
    "clip_eps": 1e-9,
    "ns_fit": "fitted",
    "adamw_lr": None,
    "adamw_betas": None,
    "adamw_weight_decay": None,
    "routing": None,
}

# Roles that get weight decay; gains and biases never do (decaying a norm gain towards 0 fights the norm).
DECAYED_ROLES = ("embedding", "head", "matrix")


def _plain(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"optim config must be a mapping (dict or DictConfig), got {type(cfg).__name__}")


def _number(c: dict[str, Any], key: str, low: float, high: float, integer: bool = False) -> None:
    v = c[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high
    if integer:
        ok = ok and float(v).is_integer()
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"optim.{key}={v!r} must be {kind} in [{low}, {high}]")
    c[key] = int(v) if integer else float(v)


def _betas(c: dict[str, Any], key: str) -> None:
    v = c[key]
    if (
        not isinstance(v, (list, tuple))
        or len(v) != 2
        or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in v)
    ):
        raise ValueError(f"optim.{key}={v!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    c[key] = (float(v[0]), float(v[1]))


def _choice(c: dict[str, Any], key: str, allowed: tuple[str, ...]) -> None:
    if c[key] not in allowed:
        raise ValueError(f"optim.{key}={c[key]!r} is not supported; allowed: {', '.join(allowed)}")


def optim_config(cfg: Any) -> dict[str, Any]:
    """Validated plain dict of the `optim` node, defaults filled in and `routing` resolved per role."""
    given = _plain(cfg)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown optim key(s) {unknown}; allowed: {', '.join(DEFAULTS)}")
    c = {**DEFAULTS, **given}
    _choice(c, "name", OPTIMIZERS)
    _choice(c, "schedule", SCHEDULES)
    _choice(c, "decay_shape", DECAY_SHAPES)
    _choice(c, "update_scale", UPDATE_SCALES)
    _choice(c, "ns_dtype", NS_DTYPES)
    _choice(c, "ns_fit", NS_FITS)
    if not isinstance(c["nesterov"], bool):
        raise ValueError(f"optim.nesterov={c['nesterov']!r} must be true or false")
    _number(c, "lr", 0.0, float("inf"))
    _number(c, "weight_decay", 0.0, float("inf"))
    _number(c, "eps", 0.0, 1.0)
    _number(c, "momentum", 0.0, 0.999999)
    _number(c, "ns_steps", 1, 100, integer=True)
    _number(c, "clip_quantile", 0.0, 1.0)
    _number(c, "clip_eps", 0.0, float("inf"))
    _number(c, "min_lr_ratio", 0.0, 1.0)
    _number(c, "decay_fraction", 0.0, 1.0)
    if c["grad_clip"] is not None:
        _number(c, "grad_clip", 0.0, float("inf"))
    _betas(c, "betas")
    for key, fallback in (("adamw_lr", "lr"), ("adamw_weight_decay", "weight_decay"), ("adamw_betas", "betas")):
        if c[key] is None:
            c[key] = c[fallback]
        elif key == "adamw_betas":
            _betas(c, key)
        else:
            _number(c, key, 0.0, float("inf"))
    c["routing"] = _routing(c["name"], c["routing"])
    return c


def _routing(name: str, routing: Mapping[str, str] | None) -> dict[str, str]:
    """Role -> algorithm. Defaults: matrices (EmbProj included) to the named optimizer, the rest to AdamW."""
    resolved = {role: "adamw" for role in ROLES}
    resolved["matrix"] = name
    if routing is None:
        return resolved
    if not isinstance(routing, Mapping):
        raise ValueError(f"optim.routing must be a mapping role -> algorithm, got {routing!r}")
    allowed = ("adamw",) if name == "adamw" else ("adamw", name)
    for role, algorithm in routing.items():
        if role not in ROLES:
            raise ValueError(f"optim.routing has unknown role {role!r}; allowed roles: {', '.join(ROLES)}")
        if algorithm not in allowed:
            raise ValueError(
                f"optim.routing.{role}={algorithm!r} is not supported with optim.name={name!r}; "
                f"allowed: {', '.join(allowed)}"
            )
        resolved[role] = algorithm
    return resolved
