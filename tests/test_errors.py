"""QuietStarInputError: what bad input raises from Python, apart from bugs."""

from __future__ import annotations

import pytest

import quietstar
from conftest import make_model, random_text
from quietstar.utils.errors import MissingDependencyError, QuietStarInputError


def test_input_errors_are_value_errors_and_exported():
    assert quietstar.QuietStarInputError is QuietStarInputError
    assert issubclass(QuietStarInputError, ValueError)  # `except ValueError` keeps catching them
    assert issubclass(MissingDependencyError, ImportError) and issubclass(MissingDependencyError, QuietStarInputError)


def test_the_library_raises_input_errors_for_bad_input():
    model = make_model()
    with pytest.raises(QuietStarInputError, match="input_ids must be"):
        model(random_text(2, 8)[0])  # 1-D ids
    with pytest.raises(QuietStarInputError, match="thought_fraction"):
        quietstar.QuietStarConfig(thought_fraction=1.5)
    from quietstar.training.checkpoint import CheckpointError

    assert issubclass(CheckpointError, QuietStarInputError)
