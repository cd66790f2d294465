"""lr schedules against hand-computed multipliers, and their LambdaLR wiring."""

import math
import pickle

import pytest
import torch

from osp.optim import OptimConfig, lr_multiplier


def test_cosine_hand_values():
    f = lr_multiplier("cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1)  # (0 + 1) / 10: the first step already learns
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # = 0.55
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)


def test_wsd_linear_and_1_sqrt():
    lin = lr_multiplier("wsd", total_steps=100, warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert [lin(s) for s in (5, 10, 79)] == pytest.approx([0.6, 1.0, 1.0])
    assert lin(80) == pytest.approx(1.0)
    assert lin(90) == pytest.approx(0.5)
    assert lin(100) == pytest.approx(0.0)
    sq = lr_multiplier("wsd", total_steps=100, warmup_steps=10, min_lr_ratio=0.2, decay_fraction=0.2,
                       decay_shape="1-sqrt")
    assert sq(85) == pytest.approx(1 - 0.8 * math.sqrt(0.25))  # = 0.6
    assert sq(100) == pytest.approx(0.2)


def test_constant_and_fractional_warmup():
    f = lr_multiplier("constant", total_steps=100, warmup_steps=0.1)
    assert f.warmup_steps == 10
    assert f(4) == pytest.approx(0.5)
    assert f(50) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schedule": "linear"}, "cosine, wsd, constant"),
        ({"schedule": "wsd", "decay_shape": "cos"}, "linear, 1-sqrt"),
        ({"schedule": "cosine", "warmup_steps": 100}, "warmup_steps"),
        ({"schedule": "cosine", "min_lr_ratio": 2.0}, "min_lr_ratio"),
    ],
)
def test_bad_values_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_multiplier(total_steps=100, **kwargs)


def test_build_scheduler_scales_each_group_from_its_own_lr():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    sched = OptimConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.0).build_scheduler(
        opt, total_steps=20)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.25, 0.025])
    for _ in range(3):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.1])
    state = pickle.loads(pickle.dumps(sched.state_dict()))
    assert state["lr_lambdas"][0]["total_steps"] == 20
