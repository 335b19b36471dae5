"""The parallel thought rollout: a thought after every token, all positions at once.

Pass layout (position i, pass p, position id ``pos_i + p``):

    pass 0            x_i                      -> base prediction of x_{i+1}
    pass 1            START                    -> predicts t_1
    pass 1+j          t_j      (j = 1..k)      -> predicts t_{j+1} (t_k's output is unused: END is forced)
    pass k+2          END                      -> post-thought prediction of x_{i+1}
    pass k+2+s        x_{i+s}  (s = 1..A-1)    -> post-thought prediction of x_{i+1+s}

``sample_thoughts`` draws t_1..t_k without gradients, one cached pass per thought token.
``score_grid`` then runs all F = k + A + 2 passes as one forward over an [F*L]-token sequence,
with gradients; training and ``score_thoughts`` both use it, so they cannot drift apart. Running
the grid as one ordinary forward is what makes activation checkpointing, FSDP and ZeRO-3 work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .attention import ThoughtLayout
from .sampling import sample


@dataclass
class GridHidden:
    """Final hidden states of a scored rollout."""

    base: torch.Tensor      # [B, L, d]     text pass: predicts x_{i+1} without a thought
    thought: torch.Tensor   # [B, L, k, d]  passes 1..k: predict t_1..t_k
    after: torch.Tensor     # [B, L, A, d]  after END and s true tokens: predict x_{i+1+s}


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token (left padding safe)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _forward(decoder, embeds, positions, layout, cache=None) -> torch.Tensor:
    B = embeds.shape[0]
    # A ready 4-D mask stops transformers from building its own; the real pattern is the layout's.
    dummy_mask = torch.ones(B, 1, 1, 1, dtype=torch.bool, device=embeds.device)
    out = decoder(inputs_embeds=embeds, attention_mask=dummy_mask, position_ids=positions,
                  cache=cache, use_cache=cache is not None, thought_layout=layout)
    return out.last_hidden_state


@torch.no_grad()
def sample_thoughts(
    decoder,
    embed,
    logits_fn,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start_id: int,
    num_tokens: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Samples a k-token thought after every position: returns [B, L, k] ids.

    ``logits_fn`` must already exclude the meta tokens, so they are never sampled inside a thought.
    The text's keys/values are computed once and every pass adds one key per position to the cache.
    """
    B, L = input_ids.shape
    positions = text_positions(attention_mask)
    valid = attention_mask.bool()
    padded = not bool(valid.all())
    cache = DynamicCache()  # no config: a sliding-window cache would evict the text's keys
    _forward(decoder, embed(input_ids), positions, ThoughtLayout(L, (0,), valid, positions, padded), cache)
    current = torch.full_like(input_ids, start_id)
    tokens = []
    for p in range(1, num_tokens + 1):
        layout = ThoughtLayout(L, (p,), valid, positions, padded)
        hidden = _forward(decoder, embed(current), positions + p, layout, cache)
        current = sample(logits_fn(hidden).view(B * L, -1), temperature, generator).view(B, L)
        tokens.append(current)
    return torch.stack(tokens, dim=-1)


def grid_ids(input_ids: torch.Tensor, thought_ids: torch.Tensor, start_id: int, end_id: int,
             ahead_tokens: int, pad_id: int) -> torch.Tensor:
    """The [B, F, L] input ids of every pass (see the module docstring)."""
    B, L = input_ids.shape
    passes = [input_ids, torch.full_like(input_ids, start_id)]
    passes += list(thought_ids.unbind(-1))
    passes.append(torch.full_like(input_ids, end_id))
    for s in range(1, ahead_tokens):
        # Teacher-forced x_{i+s}; beyond the text a pad token, whose predictions are masked out.
        passes.append(torch.cat([input_ids[:, s:], input_ids.new_full((B, min(s, L)), pad_id)], 1)[:, :L])
    return torch.stack(passes, dim=1)


def score_grid(decoder, embed, input_ids, thought_ids, attention_mask, start_id, end_id,
               ahead_tokens: int, pad_id: int) -> GridHidden:
    """All F passes as one forward with gradients: returns the hidden states that matter."""
    B, L = input_ids.shape
    k = thought_ids.shape[-1]
    ids = grid_ids(input_ids, thought_ids, start_id, end_id, ahead_tokens, pad_id)  # [B, F, L]
    F_ = ids.shape[1]
    base_pos = text_positions(attention_mask)
    positions = base_pos[:, None, :] + torch.arange(F_, device=ids.device)[None, :, None]
    valid = attention_mask.bool()
    layout = ThoughtLayout(L, tuple(range(F_)), valid, base_pos, not bool(valid.all()))
    hidden = _forward(decoder, embed(ids.view(B, F_ * L)), positions.view(B, F_ * L), layout)
    hidden = hidden.view(B, F_, L, -1)
    return GridHidden(
        base=hidden[:, 0],
        thought=hidden[:, 1:k + 1].transpose(1, 2),
        after=hidden[:, k + 2:k + 2 + ahead_tokens].transpose(1, 2),
    )
