"""Token lists as padded batches, padding read without its mask refused, and where a model's
weights live."""

from __future__ import annotations

import warnings
from typing import Collection, Sequence

import torch

from quietstar.utils.errors import QuietStarInputError


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


def check_padding_masked(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int | None,
                         text_ids: Collection[int | None] = ()) -> None:
    """Without an ``attention_mask``, refuses a batch whose rows start or end with the pad id:
    padded rows (left or right) read without their mask, the padding taken for text (transformers
    only warns). Where the pad id is also a token of real text (``text_ids``: EOS or BOS, a common
    pad), a row may start or end with it rightly, so a warning then, as transformers gives."""
    if attention_mask is not None or pad_id is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        return
    if not bool((input_ids[:, [0, -1]] == pad_id).any()):
        return
    message = (f"input_ids has rows that start or end with the pad token (id {pad_id}) and no attention_mask, so "
               "that padding would be read as text; pass the attention_mask the tokenizer gives with the padded "
               "batch (tokenizer(texts, padding=True, return_tensors='pt'))")
    if pad_id in text_ids:
        warnings.warn(f"{message}. (The pad token is also this tokenizer's EOS or BOS: if these are real "
                      "tokens of the text, ignore this.)", stacklevel=3)
        return
    raise QuietStarInputError(message)
