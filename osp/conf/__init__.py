"""osp's Hydra configuration: `configs/` (`train.yaml` and its groups) and `recipes/` (the `recipe` group), at
the top level of a checkout and installed with the package as `osp/configs` and `osp/recipes` (pyproject's
package-dir), so a wheel trains exactly as a checkout does.

`compose(overrides)` is the one way to get the config `osp train <overrides>` would run with; `osp train`
itself, `osp plan`, `osp data`, the benches and the tests all go through it.

Some options are registered in Hydra's config store rather than searched as files: the `recipe` group (every
`recipes/<name>.yaml`, each a global package, as `osp train recipe=<name>` selects it), and `model/base`,
`optim/base`, `loss/base` and `logger/base`, which are the dataclasses ModelConfig, OptimConfig,
TailLossConfig and LoggerConfig themselves
(osp.config_base): the presets extend them, so OmegaConf checks every key and type at composition and a
preset holds only what differs from the code defaults.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from osp.conf.resolvers import register_resolvers
from osp.config_base import describe_value_error
from osp.errors import ConfigError, PathNotFoundError, one_line
from osp.model.config import ModelConfig
from osp.optim.config import OptimConfig
from osp.training.logger_config import LoggerConfig
from osp.training.tail_loss import TailLossConfig


def shipped_dir(name: str) -> Path:
    """`configs` or `recipes`: the installed package osp.<name> (a wheel, or an editable install of a
    checkout), else the folder at the top of the checkout this package sits in."""
    spec = importlib.util.find_spec(f"osp.{name}")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / name


CONFIG_DIR = shipped_dir("configs")
RECIPE_DIR = shipped_dir("recipes")
TRAIN_CONFIG = "train"
# osp's typed configs are their nodes' schema (osp.config_base): the presets of a group extend `<group>/base`.
for _group, _config in (("model", ModelConfig), ("optim", OptimConfig), ("loss", TailLossConfig),
                        ("logger", LoggerConfig)):
    ConfigStore.instance().store(group=_group, name="base", node=_config.schema())
for _recipe in sorted(RECIPE_DIR.glob("*.yaml")):
    ConfigStore.instance().store(group="recipe", name=_recipe.stem, node=OmegaConf.load(_recipe),
                                 package="_global_")


def compose(overrides: Sequence[str] = (), config_name: str | None = TRAIN_CONFIG) -> DictConfig:
    """The composed config for these Hydra overrides (`recipe=osp`, `optim.lr=1e-3`, ...), unresolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (osp train), keep its state
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def composition_error(err: Exception) -> str:
    """One line for a failed composition: a value of the wrong type names its key and what it must be
    (osp.config_base), anything else is Hydra's own message on one line."""
    cause = err.__cause__ or err.__context__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        parent = getattr(cause, "parent_node", None)
        siblings = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
        close = difflib.get_close_matches(str(key).rpartition(".")[2], siblings, n=1)
        prefix = str(key).rpartition(".")[0]
        hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}? " if close else ""
        return f"{key} is not a setting ({hint}`osp train --cfg job` prints them all)"
    if isinstance(cause, OmegaConfBaseException) and key:
        return describe_value_error(cause, str(key))
    return one_line(str(err))


def presets(group: str) -> list[str]:
    """The option names of a config group (`recipe`, `data`, `trainer`, ...), sorted."""
    folder = RECIPE_DIR if group == "recipe" else CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def data_config(source: str | None, config: str | None, overrides: list[str]) -> dict[str, Any]:
    """The data config as plain values: the named preset (composed with Hydra, so its `defaults` apply, as
    in `osp train data=<source>`) or a file, then `key=value` overrides."""
    from hydra.errors import HydraException

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    try:
        if config:
            if not Path(config).is_file():
                raise PathNotFoundError(f"no data config file {config!r}")
            # Nested under `data` as in the composed training config, so interpolations such as
            # ${oc.select:seed,1234} resolve the same way (to the default here: no run-level seed).
            root = OmegaConf.create({"data": OmegaConf.load(config)})
            if "defaults" in root.data:
                raise ConfigError(f"{config} has a defaults list, which only presets can use; "
                                  "write out the keys it inherits")
            root.data = OmegaConf.merge(root.data, OmegaConf.from_dotlist(overrides))
        else:
            name = source or "demo"
            if name not in presets("data"):
                raise ConfigError(f"no data preset {name!r} (presets: {', '.join(presets('data'))})")
            root = compose([f"+data={name}", *(f"++data.{o}" for o in overrides)], config_name=None)
        values = OmegaConf.to_container(root.data, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from None
    assert isinstance(values, dict)
    return values
