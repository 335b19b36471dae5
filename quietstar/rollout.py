"""The parallel thought rollout: a thought after every token, all positions at once.

Pass layout (position i, pass p, position id ``pos_i + p``):

    pass 0            x_i                      -> base prediction of x_{i+1}
    pass 1            START                    -> predicts t_1
    pass 1+j          t_j      (j = 1..k)      -> predicts t_{j+1} (t_k's output is unused: END is forced)
    pass k+2          END                      -> post-thought prediction of x_{i+1}
    pass k+2+s        x_{i+s}  (s = 1..A-1)    -> post-thought prediction of x_{i+1+s}

Two ways to run it, equal to float tolerance:

- ``sample_and_score`` (training): the passes run with gradients while the thought is sampled,
  one call per thought token (text and START share the first call, the A + 1 passes after the
  last sampled token share the last), every layer's keys kept per pass in the layout's key
  store. Each pass is computed once, as in F plain forward passes.
- ``sample_thoughts`` + ``score_grid``: sample without gradients, then score all F = k + A + 2
  passes as ONE forward over an [F*L]-token sequence. Fixed thoughts (``score_thoughts``) need
  only the second half; activation checkpointing needs a single forward to recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import ThoughtLayout


@dataclass
class GridHidden:
    """Final hidden states of a scored rollout."""

    base: torch.Tensor      # [B, L, d]     text pass: predicts x_{i+1} without a thought
    thought: torch.Tensor   # [B, L, k, d]  passes 1..k: predict t_1..t_k
    after: torch.Tensor     # [B, L, A, d]  after END and s true tokens: predict x_{i+1+s}


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token (left padding safe)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _Passes:
    """Runs the passes of one rollout, in order, one or several per call."""

    def __init__(self, decoder, embed, attention_mask: torch.Tensor, keep_keys: bool):
        self.decoder, self.embed = decoder, embed
        self.positions = text_positions(attention_mask)
        self.valid = attention_mask.bool()
        self.padded = not bool(self.valid.all())
        self.key_store = {} if keep_keys else None
        self.done = 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Runs the next P passes, ``ids`` [B, P, L]: returns their final hidden states [B, P, L, d]."""
        B, P, L = ids.shape
        passes = tuple(range(self.done, self.done + P))
        layout = ThoughtLayout(L, passes, self.valid, self.positions, self.padded, self.key_store)
        offsets = torch.arange(self.done, self.done + P, device=ids.device)
        positions = (self.positions[:, None, :] + offsets[None, :, None]).reshape(B, P * L)
        # A ready 4-D mask stops transformers from building its own; the real pattern is the layout's.
        dummy_mask = torch.ones(B, 1, 1, 1, dtype=torch.bool, device=ids.device)
        hidden = self.decoder(inputs_embeds=self.embed(ids.reshape(B, P * L)), attention_mask=dummy_mask,
                              position_ids=positions, use_cache=False, thought_layout=layout).last_hidden_state
        self.done += P
        return hidden.view(B, P, L, -1)


def _sample_passes(run: _Passes, head, input_ids, start_id: int, num_tokens: int, temperature: float,
                   generator, logprob_temperature: float | None = None):
    """Runs passes 0..k (text, START, t_1..t_{k-1}) and samples t_j from pass j's output with
    ``head`` (a ``vocab.VocabHead``). Returns the thoughts [B, L, k], the hidden states [B, L, d]
    of passes 0..k and, with ``logprob_temperature``, the thought tokens' log-probabilities at
    that temperature [B, L, k] (with gradients; from the logits they were sampled from)."""
    B, L = input_ids.shape
    if num_tokens == 0:
        return input_ids.new_zeros(B, L, 0), list(run(input_ids[:, None]).unbind(1)), None
    hidden = list(run(torch.stack([input_ids, torch.full_like(input_ids, start_id)], 1)).unbind(1))
    tokens, logps = [], []
    for j in range(1, num_tokens + 1):
        token, logp = head.sample(hidden[j], temperature, generator, logprob_temperature)  # [B, L]
        tokens.append(token)
        logps.append(logp)
        if j < num_tokens:
            hidden.append(run(token[:, None])[:, 0])
    thought_logp = torch.stack(logps, dim=-1) if logprob_temperature is not None else None
    return torch.stack(tokens, dim=-1), hidden, thought_logp


@torch.no_grad()
def sample_thoughts(
    decoder,
    embed,
    head,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start_id: int,
    num_tokens: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Samples a k-token thought after every position: returns [B, L, k] ids.

    ``head`` (a ``vocab.VocabHead``) must mask the meta tokens, so they are never sampled inside
    a thought. The text's keys/values are computed once and every pass adds one key per position.
    """
    run = _Passes(decoder, embed, attention_mask, keep_keys=True)
    return _sample_passes(run, head, input_ids, start_id, num_tokens, temperature, generator)[0]


def sample_and_score(decoder, embed, head, input_ids, attention_mask, start_id: int, end_id: int,
                     num_tokens: int, ahead_tokens: int, temperature: float, pad_id: int,
                     generator: torch.Generator | None = None, logprob_temperature: float = 1.0):
    """Samples thoughts and scores them in the same passes, with gradients.

    Returns (thoughts [B, L, k], GridHidden, the thought tokens' log-probabilities at
    ``logprob_temperature`` [B, L, k]): the REINFORCE log-probabilities come from the chunks
    of logits the tokens were sampled from, so no [tokens x V] tensor is kept for them.
    Not under activation checkpointing: recomputing a call would store its keys twice.
    """
    k = num_tokens
    run = _Passes(decoder, embed, attention_mask, keep_keys=True)
    thoughts, hidden, thought_logp = _sample_passes(run, head, input_ids, start_id, k, temperature,
                                                    generator, logprob_temperature)
    ids = grid_ids(input_ids, thoughts, start_id, end_id, ahead_tokens, pad_id)
    rest = run(ids[:, k + 1:])  # t_k, END and the teacher-forced tokens: [B, A + 1, L, d]
    grid = GridHidden(base=hidden[0], thought=torch.stack(hidden[1:k + 1], dim=2),
                      after=rest[:, 1:].transpose(1, 2))
    return thoughts, grid, thought_logp


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
    k = thought_ids.shape[-1]
    ids = grid_ids(input_ids, thought_ids, start_id, end_id, ahead_tokens, pad_id)  # [B, F, L]
    hidden = _Passes(decoder, embed, attention_mask, keep_keys=False)(ids)
    return GridHidden(
        base=hidden[:, 0],
        thought=hidden[:, 1:k + 1].transpose(1, 2),
        after=hidden[:, k + 2:k + 2 + ahead_tokens].transpose(1, 2),
    )
