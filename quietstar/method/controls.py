"""The "shifted" control thought: the model's own thoughts moved to another position of the text.

If a model gains as much from fluent thoughts about another place in the text as from its own,
the gain does not come from what its thoughts say. ``evaluation.tasks.thoughts_for`` offers it
as a thought source, and training logs own - shifted on the held-out batches
(``training.components.HeldoutLoss``).
"""

from __future__ import annotations

import torch


def shifted_thoughts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, num_tokens: int | None,
                     temperature: float | None = None, generator: torch.Generator | None = None,
                     thought_positions: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, k]: ``model``'s own thoughts (``sample_thoughts``), each moved to the position L // 2
    further along the row (cyclically). With ``thought_positions`` [B, L] bool only those get
    one, sampled where it comes from."""
    shift = input_ids.shape[1] // 2
    if thought_positions is not None:  # sample where they come from
        thought_positions = torch.roll(thought_positions, shifts=shift, dims=1)
    thoughts = model.sample_thoughts(input_ids, attention_mask, num_tokens=num_tokens, temperature=temperature,
                                     generator=generator, thought_positions=thought_positions)
    return torch.roll(thoughts, shifts=-shift, dims=1)
