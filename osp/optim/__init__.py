"""Optimizers: Muon and ROOT (with AdamW groups inside), role-based routing, lr schedules.

`OptimConfig.from_dict(cfg.optim).build(model)` is the one way to get the optimizer of a config, and
`.build_scheduler(optimizer, total_steps)` its LR schedule.
"""

from osp.optim.config import OptimConfig
from osp.optim.groups import describe_groups
from osp.optim.muon import Muon
from osp.optim.newton_schulz import newton_schulz
from osp.optim.root import ROOT
from osp.optim.schedules import lr_multiplier

__all__ = ["Muon", "OptimConfig", "ROOT", "describe_groups", "lr_multiplier", "newton_schulz"]
