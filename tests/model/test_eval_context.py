import pytest
from torch import nn

from osp.model.eval_context import eval_mode


def test_eval_mode_restores_every_module_flag_also_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a caller froze one part on purpose
    with pytest.raises(RuntimeError), eval_mode(model) as m:
        assert m is model
        assert not any(x.training for x in model.modules())
        raise RuntimeError("body fails")
    assert model.training and model[0].training
    assert not model[1].training
