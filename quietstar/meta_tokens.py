"""The learned <|startofthought|> / <|endofthought|> tokens.

The base model's embedding matrix is left untouched; the two meta vectors live in their own small
parameter and are spliced in by ``MetaTokenEmbedding``. They are stored divided by the learning-
rate multiplier and multiplied back when used: under Adam the update size does not depend on the
gradient's scale, so this makes them learn ``multiplier`` times faster with any optimiser setup.
"""

from __future__ import annotations

import torch
from torch import nn


def add_meta_tokens(tokenizer, start: str, end: str) -> tuple[int, int]:
    """Adds START/END as special tokens (if absent) and returns their ids."""
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token; set one before wrapping, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token` (padding is masked out of the loss)")
    missing = [t for t in (start, end) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing},
                                     replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids([start, end])
    for token, idx in zip((start, end), ids):
        encoded = tokenizer(token, add_special_tokens=False).input_ids
        if idx is None or encoded != [idx]:
            raise ValueError(f"the tokenizer does not encode {token!r} as one token (got {encoded}); "
                             "it cannot hold quietstar's meta tokens")
    return ids[0], ids[1]


class MetaTokenEmbedding(nn.Module):
    """The base input embedding with the two meta-token rows replaced by learned vectors.

    Calling it on any ids returns exactly the vectors fed to the LM (as ``inputs_embeds``).
    """

    def __init__(self, base: nn.Module, start_id: int, end_id: int, init_vector: torch.Tensor,
                 lr_multiplier: float):
        super().__init__()
        self.base = base
        self.start_id, self.end_id = start_id, end_id
        self.lr_multiplier = lr_multiplier
        self.scaled_vectors = nn.Parameter(init_vector.detach().clone().expand(2, -1).contiguous()
                                           / lr_multiplier)

    @property
    def meta_vectors(self) -> torch.Tensor:
        """[2, d]: the START and END vectors as fed to the LM."""
        return self.scaled_vectors * self.lr_multiplier

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_start, is_end = ids == self.start_id, ids == self.end_id
        is_meta = is_start | is_end
        # Meta ids may lie beyond the base matrix: look up a harmless id there, then overwrite.
        out = self.base(ids.masked_fill(is_meta, 0))
        meta = self.meta_vectors.to(out.dtype)[is_end.long()]
        return torch.where(is_meta.unsqueeze(-1), meta, out)
