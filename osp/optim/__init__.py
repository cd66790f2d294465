"""Optimizers: Muon and ROOT (with AdamW groups inside), role-based routing, lr schedules."""

from osp.optim.groups import build_optimizer, describe_groups, param_groups
from osp.optim.muon import Muon
from osp.optim.newton_schulz import newton_schulz
from osp.optim.root import ROOT
from osp.optim.schedules import build_scheduler, lr_multiplier

__all__ = [
    "Muon",
    "ROOT",
    "build_optimizer",
    "build_scheduler",
    "describe_groups",
    "lr_multiplier",
    "newton_schulz",
    "param_groups",
]
