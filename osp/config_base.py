"""The one config base of osp: a dataclass is the schema of its config node.

`ModelConfig`, `OptimConfig`, `TailLossConfig`, `QuantConfig` and the data settings derive from `ConfigBase`.
Their fields (names, types, defaults) are the schema in both places a config comes from:

- `osp train` composes them as Hydra structured configs (osp.conf registers them), so OmegaConf refuses an
  unknown key or a value of the wrong type at composition, and the YAML presets hold only what differs from
  the code defaults;
- everything else (checkpoints, exported folders, tests, the benches) builds them with `from_dict`, which runs
  the same OmegaConf check and turns its error into one line naming the key.

Value ranges and combinations (`d_model` divisible by `n_heads`, ...) are each class's `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from osp.errors import ConfigError

C = TypeVar("C", bound="ConfigBase")


class ConfigBase:
    """Mixin of the config dataclasses: `from_dict` (checked against the fields) and `to_dict` (plain
    values)."""

    SECTION: ClassVar[str] = ""  # the config node's name in error messages: "model", "optim", ...
    ERROR: ClassVar[type[ConfigError]] = ConfigError

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any] | DictConfig | C | None = None) -> C:
        """The config of a mapping (dict or DictConfig; None: every default). An unknown key, a value of the
        wrong type or a missing mandatory one is `cls.ERROR` naming `<section>.<key>`."""
        if isinstance(values, cls):
            return values
        if values is not None and not isinstance(values, (Mapping, DictConfig)):
            raise cls.ERROR(f"the {cls.SECTION or 'config'} node must be a mapping of settings, got "
                            f"{type(values).__name__} {values!r}")
        try:
            node = OmegaConf.merge(cls.schema(), values if values is not None else {})
            return OmegaConf.to_object(node)  # type: ignore[return-value]
        except OmegaConfBaseException as err:
            raise cls.ERROR(cls.describe(err)) from None

    @classmethod
    def schema(cls) -> DictConfig:
        """The config node of the dataclass (typed, closed to unknown keys), writable even for a frozen one:
        what osp.conf registers for Hydra and what `from_dict` checks against."""
        node = OmegaConf.structured(cls)
        OmegaConf.set_readonly(node, False)
        return node

    @classmethod
    def describe(cls, err: OmegaConfBaseException) -> str:
        """One line for an OmegaConf error about this node."""
        key = f"{cls.SECTION}.{err.full_key}" if cls.SECTION else str(err.full_key)
        if isinstance(err, ConfigKeyError):
            names = ", ".join(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
            return f"{key} is not a {cls.SECTION or 'config'} setting; the settings: {names}"
        return describe_value_error(err, key)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values (tuples as lists): what checkpoints and run records store."""
        return _json_values(dataclasses.asdict(self))  # type: ignore[call-overload]


# What OmegaConf's "could not be converted to <Type>" means in the words of osp's messages.
KINDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def describe_value_error(err: OmegaConfBaseException, key: str) -> str:
    """`<key> must be an integer, got 'abc'` for a value of the wrong type (or a missing one) at `key`."""
    if isinstance(err, MissingMandatoryValue):
        return f"{key} is required"
    text = str(err).splitlines()[0]
    match = re.search(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", text)
    if match:
        return f"{key} must be {KINDS.get(match.group(2), match.group(2))}, got {match.group(1)!r}"
    if "is not a ListConfig, list or tuple" in text:
        return f"{key} must be a list, got {getattr(err, 'value', None)!r}"
    if "is not a subclass of" in text or "Cannot assign" in text or "DictConfig" in text:
        return f"{key} has the wrong kind of value ({text})"
    return f"{key}: {text}"


def _json_values(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_values(v) for v in value]
    return value
