"""utils.modes.eval_mode: eval mode inside the block, the module's own mode after it."""

from __future__ import annotations

import pytest
from torch import nn

from quietstar.utils.modes import eval_mode


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))


@pytest.mark.parametrize("training", [True, False])
def test_eval_inside_and_the_mode_restored_after(training):
    module = net().train(training)
    with eval_mode(module) as inside:
        assert inside is module
        assert not module.training and not module[1].training
    assert module.training is training and module[1].training is training


@pytest.mark.parametrize("training", [True, False])
def test_the_mode_is_restored_after_an_exception(training):
    module = net().train(training)
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(module):
            raise RuntimeError("inside")
    assert module.training is training and module[1].training is training
