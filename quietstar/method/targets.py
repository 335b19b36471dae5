"""A training step's targets and log-likelihoods, between the rollout and the objective.

``QuietStarForCausalLM.forward`` samples and scores the thoughts (``rollout``), mixes
(``mixing``), takes the log-likelihoods here and hands them to ``losses.quietstar_loss_terms``.
Every vocabulary-sized product goes through the ``vocab.VocabHead`` it is given (chunked). With
thought rows (``thought_fraction`` < 1 or ``thought_positions``) the mixed, thought and
post-thought log-likelihoods are computed over the W = S rows that thought and put back at
their positions; the base NLL is over all L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quietstar.method.config import QuietStarConfig
from quietstar.method.rollout import GridHidden
from quietstar.method.vocab import VocabHead
from quietstar.utils.errors import QuietStarInputError


def training_targets(input_ids, attention_mask, labels, ahead_tokens: int):
    """The training targets: (target ids, target valid), both [B, L, A]: x_{i+1+s}."""
    B, L = input_ids.shape
    A = ahead_tokens
    if L < A + 1:
        raise QuietStarInputError(f"sequence length {L} is shorter than ahead_tokens + 1 = {A + 1}: each "
                                  f"thought is trained to predict {A} true tokens; use longer sequences "
                                  "or a smaller ahead_tokens")
    if labels is not None and labels.shape != input_ids.shape:
        raise QuietStarInputError(f"labels has shape {tuple(labels.shape)} but input_ids has "
                                  f"{tuple(input_ids.shape)}; they must match")
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    # targets[b, i, s] = x_{i+1+s}, valid where inside the text and not ignored, and only at
    # real positions: with left padding the last padding position would otherwise "predict"
    # the first real token.
    padded = torch.cat([labels, labels.new_full((B, A), -100)], dim=1)
    targets = torch.stack([padded[:, 1 + s:1 + s + L] for s in range(A)], dim=-1)
    valid = (targets != -100) & attention_mask.bool()[:, :, None]
    return targets.clamp(min=0), valid


def loss_head(config: QuietStarConfig, head: VocabHead) -> VocabHead:
    """The head whose softmax the NLLs and rewards use: ``head`` (the meta tokens masked, as the
    model predicts), or with ``meta_tokens_in_loss`` the full softmax, as the reference code's
    losses. The thought tokens' REINFORCE log-probabilities keep ``head``: they are sampled masked."""
    return head.unmasked() if config.meta_tokens_in_loss else head


@dataclass
class StepLogprobs:
    """The log-likelihoods ``losses.quietstar_loss_terms`` takes, and where they count, at every
    position [B*n, L, ...] (rows grouped as [B*n], the n thoughts of a text adjacent)."""

    base: torch.Tensor                   # [B*n, L]     log p_base(x_{i+1})
    mixed: torch.Tensor                  # [B*n, L, A]  log p_mix(x_{i+1+s}) (0 where no thought)
    thought: torch.Tensor                # [B*n, L, k]  the thought tokens, REINFORCE temperature
    target_valid: torch.Tensor           # [B*n, L, A]  x_{i+1+s} exists and is not ignored
    row_valid: torch.Tensor              # [B*n, W, A]  the thought rows' valid targets (all L: target_valid)
    after: torch.Tensor | None = None    # [B*n, L, A]  post-thought, unmixed (when needed)
    thought_valid: torch.Tensor | None = None  # [B*n, L, A]  where thoughts count; None: every valid target


def step_logprobs(config: QuietStarConfig, head: VocabHead, grid: GridHidden, mixed: torch.Tensor,
                  thoughts: torch.Tensor, thought_logp: torch.Tensor | None, targets: torch.Tensor,
                  valid: torch.Tensor) -> StepLogprobs:
    """The log-likelihoods of a scored rollout ``grid`` (its W rows: all L, or ``grid.rows``):
    base next token, mixed A tokens (``mixed`` [B*n, W, A, d]), thought tokens ``thoughts``
    [B*n, W, k] at the REINFORCE temperature (``thought_logp`` if the sampling computed them,
    else from the thought passes), and the unmixed post-thought prediction: with gradient for
    ``thought_loss_weight`` > 0, without for ``reward_source="thought"`` alone. ``targets`` and
    ``valid`` [B*n, L, A] are ``training_targets``' (repeated n times)."""
    rows = grid.rows
    L = grid.base.shape[1]
    nll_head = loss_head(config, head)
    row_targets = targets if rows is None else rows.gather(targets)           # [B*n, W, A]
    base = nll_head.logprobs(grid.base, targets[..., 0])                      # [B*n, L]
    mixed_logp = nll_head.logprobs(mixed, row_targets)                        # [B*n, W, A]
    if thought_logp is None:  # not sampled in the scored passes: from their hidden states
        thought_logp = head.logprobs(grid.thought, thoughts, config.policy_logprob_temperature)
    after = None
    if config.thought_loss_weight > 0 or config.reward_source == "thought":
        # with a gradient only as a loss term; the reward alone needs none
        with torch.set_grad_enabled(torch.is_grad_enabled() and config.thought_loss_weight > 0):
            after = nll_head.logprobs(grid.after, row_targets)
    if rows is None:
        return StepLogprobs(base, mixed_logp, thought_logp, valid, valid, after)
    # back to [B*n, L, ...]; positions without a thought count in the base NLL only
    return StepLogprobs(base, rows.scatter(mixed_logp, L), rows.scatter(thought_logp, L), valid,
                        rows.gather(valid) & rows.valid[..., None],
                        after=None if after is None else rows.scatter(after, L),
                        thought_valid=valid & rows.mask(L)[..., None])
