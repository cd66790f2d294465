"""osp's Hydra configuration, shipped inside the package: `train.yaml`, its groups and the recipes.

`compose(overrides)` is the one way to get the config `osp train <overrides>` would run with; `osp train`
itself, `osp plan`, `osp data`, the benches and the tests all go through it.

`model/base` is not a file: it is `osp.model.ModelConfig`'s defaults, registered here in Hydra's config store
so that the model presets extend the dataclass instead of restating it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from osp.conf.resolvers import register_resolvers
from osp.model.config import config_defaults

CONFIG_DIR = Path(__file__).resolve().parent
TRAIN_CONFIG = "train"
ConfigStore.instance().store(group="model", name="base", node=config_defaults())


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


def presets(group: str) -> list[str]:
    """The option names of a config group (`recipe`, `data`, `trainer`, ...), sorted."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
