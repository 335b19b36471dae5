"""Training from a saved QuietStar model continues from its learned START/END vectors and mixing
head, not fresh ones (``training.components.build_model``)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from quietstar.method.config import QuietStarConfig
from quietstar.models.saved_model import head_state_dict
from quietstar.training.components import build_model
from quietstar.training.config import TrainConfig
from quietstar.utils.errors import QuietStarInputError


@pytest.fixture
def trained_folder(tmp_path):
    """A saved QuietStar model whose head and meta vectors differ from fresh ones."""
    model = make_model()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("mixing_head") or name == "embedding.scaled_vectors":
                p.add_(torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "trained")
    return tmp_path / "trained", head_state_dict(model)


def test_training_from_a_saved_model_keeps_its_head(trained_folder, tiny_model_dir):
    folder, saved = trained_folder
    settings = QuietStarConfig(sampled_thought_tokens=2, ahead_tokens=2)  # other thought settings are fine
    built = head_state_dict(build_model(TrainConfig(model=str(folder), quietstar=settings)))
    assert built.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(built[key], saved[key], rtol=0, atol=0)
    fresh = head_state_dict(build_model(TrainConfig(model=str(tiny_model_dir), quietstar=settings)))
    assert any(not torch.equal(fresh[key], saved[key]) for key in saved)  # the case is not trivial


def test_a_head_that_does_not_fit_the_settings_is_refused(trained_folder):
    folder, _ = trained_folder
    settings = QuietStarConfig(sampled_thought_tokens=2, ahead_tokens=2, mixing_head_hidden_size=7)
    with pytest.raises(QuietStarInputError, match="is a saved QuietStar model.*mixing_head_hidden_size"):
        build_model(TrainConfig(model=str(folder), quietstar=settings))
