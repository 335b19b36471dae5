"""Token lists as padded batches, and where a model's weights live."""

from __future__ import annotations

from typing import Sequence

import torch


def model_device(model) -> torch.device:
    """The device of the model's (first) parameters, where its inputs belong."""
    return next(model.parameters()).device


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, side: str,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads token lists to [B, T] ids and attention mask, on the ``side`` given ("left" or
    "right"), T the longest list's length."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for b, s in enumerate(sequences):
        span = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[b, span] = torch.tensor(s, dtype=torch.long)
        mask[b, span] = 1
    return ids.to(device), mask.to(device)
