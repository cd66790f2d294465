"""The `logger` config node (osp.config_base): what `build_loggers` (osp.training.loggers) starts. Kept apart
from the loggers themselves so that composing a config does not import Lightning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from osp.config_base import ConfigBase


@dataclass
class WandbConfig(ConfigBase):
    SECTION: ClassVar[str] = "logger.wandb"

    enabled: bool = True
    project: str = "osp"
    entity: str | None = None
    # null = auto (online with an API key, offline without) | online | offline | disabled
    mode: str | None = None


@dataclass
class LoggerConfig(ConfigBase):
    """The `logger` node: CSV (always read by `osp report`), wandb, tensorboard."""

    SECTION: ClassVar[str] = "logger"

    csv: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False
