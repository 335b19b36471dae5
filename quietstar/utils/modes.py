"""A module's train / eval mode for the length of a block."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout) inside the block; after it, on an exception too,
    ``module.train(mode)`` with the mode ``module`` itself had before (which sets its children
    alike)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
