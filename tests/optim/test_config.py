"""OptimConfig: the YAML files and the dataclass agree, validation on every construction, round trips."""

import dataclasses

import pytest

from osp.conf import compose, presets
from osp.optim import OptimConfig


@pytest.mark.parametrize("name", presets("optim"))
def test_each_optim_file_is_the_dataclass_defaults_for_its_name(name):
    # The YAML comments the settings; the code holds the same defaults (warmup_steps 100 in both). The file
    # alone, not train.yaml, whose default recipe (tiny) changes lr and warmup.
    assert OptimConfig.from_dict(compose(config_name=f"optim/{name}").optim) == OptimConfig(name=name)


def test_defaults_resolve_fallbacks_and_routing():
    c = OptimConfig(name="muon", lr=0.02, betas=(0.8, 0.9))
    assert (c.adamw_lr, c.adamw_betas, c.adamw_weight_decay) == (0.02, (0.8, 0.9), c.weight_decay)
    assert c.routing == {"embedding": "adamw", "head": "adamw", "matrix": "muon", "gain": "adamw",
                         "bias": "adamw"}
    assert c.warmup_steps == 100


def test_to_dict_round_trips_and_is_plain():
    c = OptimConfig.from_dict({"name": "root", "betas": [0.9, 0.99], "routing": {"gain": "root"},
                               "ns_fit": "muon"})
    d = c.to_dict()
    assert d["betas"] == [0.9, 0.99] and type(d["routing"]) is dict and d["routing"]["gain"] == "root"
    assert OptimConfig.from_dict(d) == c


def test_frozen_and_validated_on_direct_construction():
    with pytest.raises(dataclasses.FrozenInstanceError):
        OptimConfig().lr = 1.0
    with pytest.raises(ValueError, match=r"optim.lr=-1"):
        OptimConfig(lr=-1)
    with pytest.raises(ValueError, match=r"optim.nesterov"):
        OptimConfig(nesterov="yes")


@pytest.mark.parametrize("value", [-1, 1.5, "10", True])
def test_bad_warmup_names_the_key(value):
    with pytest.raises(ValueError, match=r"optim.warmup_steps"):
        OptimConfig(warmup_steps=value)


def test_warmup_fraction_is_kept_until_the_run_length_is_known():
    import torch

    c = OptimConfig(warmup_steps=0.25, schedule="constant")
    assert c.warmup_steps == 0.25
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = c.build_scheduler(opt, total_steps=40)
    assert sched.lr_lambdas[0].warmup_steps == 10


def test_from_dict_rejects_unknown_keys_and_non_mappings():
    with pytest.raises(ValueError,
                       match=r"optim.learning_rate is not a optim setting; the settings: name, lr"):
        OptimConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="mapping"):
        OptimConfig.from_dict(["adamw"])
    assert OptimConfig.from_dict(None) == OptimConfig()
