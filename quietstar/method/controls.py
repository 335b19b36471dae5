"""The "shifted" control thought: the model's own thoughts moved to another position of the text.

If a model gains as much from fluent thoughts about another place in the text as from its own,
the gain does not come from what its thoughts say. ``evaluation.tasks.thoughts_for`` offers it
as a thought source, and training logs own - shifted on the held-out batches
(``training.components.HeldoutLoss``).
"""

from __future__ import annotations

import torch

from quietstar.method.selection import ThoughtRows


def shifted_thoughts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, num_tokens: int | None,
                     temperature: float | None = None, generator: torch.Generator | None = None,
                     thought_positions: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, k]: ``model``'s own thoughts (``sample_thoughts``, at the same positions from the
    same generator) moved among each document's thinking positions: the real positions of
    ``thought_positions`` [B, L] bool, or every real position. A document's S thinking positions
    p_0 < .. < p_{S-1} in text order: p_r gets the thought of p_{(r + S // 2) mod S}, half the
    document's thinking positions further on, cyclically (every real position of an unpadded row
    thinking: the position L // 2 further on). So a shifted thought always comes from a position
    of the same document that thought; a document with one thinking position keeps its own (there
    is no other to take: own - shifted is 0 there, which understates the content's effect and
    never inflates it). The pad id everywhere else (padding, positions that do not think)."""
    thoughts = model.sample_thoughts(input_ids, attention_mask, num_tokens=num_tokens, temperature=temperature,
                                     generator=generator, thought_positions=thought_positions)
    thinking = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if thought_positions is not None:
        thinking = thinking & thought_positions
    rows = ThoughtRows.from_mask(thinking)                    # index [B, S] in text order, valid [B, S]
    count = rows.valid.sum(1, keepdim=True).clamp(min=1)        # [B, 1] S_b
    source = (torch.arange(rows.index.shape[1], device=count.device)[None] + count // 2) % count  # [B, S]
    own = rows.gather(thoughts)                                 # [B, S, k]
    moved = own.gather(1, source[..., None].expand_as(own))      # [B, S, k]
    return rows.scatter(moved, input_ids.shape[1], model.tokenizer.pad_token_id)
