"""The successors of Quiet-STaR on the same rollout: RLP and RPT (``QuietStarConfig.objective``).

Position i predicts x_{i+1}; a thought c is sampled after x_0..x_i (START c END) by the LM
itself at ``thought_temperature``; G = ``thoughts_per_position`` thoughts per chosen position
form a group; h = ``ahead_tokens`` is the next-token horizon. p_theta is the post-thought
prediction of the LM (no mixing head: the LM reads its own thought), teacher-forced over the h
true tokens. Nothing vocabulary-sized is made here: the log-likelihoods come from the chunked
``vocab.VocabHead``.

RLP (Reinforcement as a Pretraining Objective; EMA copy p_EMA with decay tau = ``ema_decay``):

    r(c)     = sum_{s<h} [log p_theta(x_{i+1+s} | x_<=i, c, x_{i+1..i+s})
                          - log p_EMA(x_{i+1+s} | x_<=i+s)]        both without gradient
    A(c_g)   = G/(G-1) * (r(c_g) - mean_{g'} r(c_g'))              leave-one-out advantage
    rho_u    = exp(log pi_theta(c_u) - log pi_old(c_u))            per thought token u
    L(c)     = -(1/|c|) sum_u min(rho_u A, clip(rho_u, 1 - eps_low, 1 + eps_high) A)
    loss     = mean over the thoughts of L(c) [+ next_token_loss_weight * base NLL]

pi is the sampling policy, log_softmax(z / thought_temperature). pi_old is the policy that
sampled the thoughts, its log-probabilities detached: one update per batch of thoughts (what
training does) makes rho = 1 in value, and the surrogate's gradient is A * grad log pi, the
clipping acting only when a batch of thoughts serves several updates (``clipped_surrogate``
takes pi_old's log-probabilities for that). Gradients reach the thought tokens only: the reward
is detached and there is no KL term.

RPT (Reinforcement Pre-Training):

    r(c)     = 1 if the greedy post-thought prediction y = argmax p_theta(. | x_<=i, c) is an
               exact prefix of the true continuation that ends on a token boundary, else 0
    A(c_g)   = r(c_g) - mean_{g'} r(c_g')                          group baseline
    loss     = the same clipped surrogate [+ next_token_loss_weight * base NLL]

With a token-level model "an exact prefix ending on a token boundary" means: y's token text
equals the concatenated texts of x_{i+1} .. x_{i+j} for some 1 <= j <= h (j = 1: y = x_{i+1}).
Token texts are the tokenizer's own strings (``convert_ids_to_tokens``: byte-level BPE and
SentencePiece pieces concatenate to the text's bytes), so "48" predicted before "4" "8" counts.
Without them (``token_strings=None``) only j = 1, y = x_{i+1}, counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quietstar.method.config import QuietStarConfig
from quietstar.method.rollout import GridHidden
from quietstar.method.selection import ThoughtRows
from quietstar.method.vocab import VocabHead
from quietstar.utils.errors import QuietStarInputError


@dataclass
class ThoughtLogprobs:
    """What ``successor_loss_terms`` takes, computed once by ``thought_logprobs``. Rows are
    grouped as [B*G] (the G thoughts of a text adjacent); W thought rows per sequence (all L,
    or the chosen ``rows``)."""

    base: torch.Tensor          # [B*G, L]     log p_theta(x_{i+1} | x_<=i), no thought
    target_valid: torch.Tensor  # [B*G, L, h]  x_{i+1+s} exists and is not ignored
    after: torch.Tensor         # [B*G, W, h]  log p_theta(x_{i+1+s} | x_<=i, c, ...), no gradient
    thought: torch.Tensor       # [B*G, W, k]  log pi_theta of the thought tokens, with gradient
    thought_mask: torch.Tensor  # [B*G, W, k]  the thought's own tokens (False after an early end)
    row_targets: torch.Tensor   # [B*G, W, h]  x_{i+1+s} of each row
    row_valid: torch.Tensor     # [B*G, W, h]  the row thinks and x_{i+1+s} is valid
    thought_ids: torch.Tensor   # [B*G, W, k]  the thoughts (ids after an early end: not read)
    predicted: torch.Tensor | None = None  # [B*G, W] rpt: the greedy post-thought token
    rows: ThoughtRows | None = None        # the W rows' positions; None: all L


def thought_logprobs(config: QuietStarConfig, head: VocabHead, grid: GridHidden, thoughts: torch.Tensor,
                     thought_logp: torch.Tensor | None, targets: torch.Tensor, valid: torch.Tensor, *,
                     thought_head: VocabHead | None = None, base: torch.Tensor | None = None) -> ThoughtLogprobs:
    """The log-likelihoods of a scored rollout ``grid`` that RLP / RPT need: ``thoughts``
    [B*G, W, k], their log-probabilities at the sampling temperature ``thought_logp`` (from the
    sampling passes; None: from ``grid.thought`` by ``thought_head``, the head they were sampled
    from, default ``head``: ``Rollout.thought_head``), ``targets`` / ``valid`` [B*G, L, h] of
    ``targets.training_targets`` (repeated G times). ``grid.thought_mask`` says which thought
    ids are the thought's own (None: all). ``base`` [B*G, L]: the base log-likelihoods of
    x_{i+1} when computed already (``grid.base`` is not read then)."""
    rows = grid.rows
    row_targets = targets if rows is None else rows.gather(targets)            # [B*G, W, h]
    row_valid = valid if rows is None else rows.gather(valid) & rows.valid[..., None]
    # The LM's own next-token prediction: a loss term only when asked for, else a metric.
    if base is None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and config.next_token_loss_weight > 0):
            base = head.logprobs(grid.base, targets[..., 0])                  # [B*G, L]
    if thought_logp is None:  # given thoughts: from the passes that read them
        thought_logp = (thought_head or head).logprobs(grid.thought, thoughts, config.thought_logprob_temperature)
    predicted = None
    with torch.no_grad():  # the reward: no gradient
        after = head.logprobs(grid.after, row_targets)                        # [B*G, W, h]
        if config.objective == "rpt":
            predicted = head.sample(grid.after[:, :, 0], 0.0)[0]              # [B*G, W] greedy
    thought_mask = torch.ones_like(thoughts, dtype=torch.bool) if grid.thought_mask is None else grid.thought_mask
    return ThoughtLogprobs(base, valid, after, thought_logp, thought_mask, row_targets, row_valid, thoughts,
                           predicted, rows)


def information_gain(after: torch.Tensor, ema: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """RLP's reward r(c) = sum_{s<h} [log p_theta(x_{i+1+s} | x_<=i, c, x_{i+1..i+s}) - log
    p_EMA(x_{i+1+s} | x_<=i+s)]: ``after`` / ``ema`` [..., h] the two log-likelihoods, ``valid``
    [..., h] (float: 1 where x_{i+1+s} exists and counts). Returns [...]."""
    return ((after - ema) * valid).sum(-1)


@torch.no_grad()
def update_ema(ema: nn.Module, live: nn.Module, decay: float) -> None:
    """RLP's EMA copy after an optimiser step: ema = decay * ema + (1 - decay) * live, parameter
    by parameter (the two modules alike in structure)."""
    for copy, param in zip(ema.parameters(), live.parameters(), strict=True):
        copy.lerp_(param.detach().to(copy.dtype), 1.0 - decay)


def join_row_parts(parts: Sequence[ThoughtLogprobs], base: torch.Tensor, rows: ThoughtRows) -> ThoughtLogprobs:
    """One ThoughtLogprobs of ``rows`` from ``parts`` over consecutive groups of its W rows (in
    order), detached, with ``base`` [B*G, L] (which may keep its gradient)."""
    def cat(name):
        values = [getattr(part, name) for part in parts]
        return None if values[0] is None else torch.cat([v.detach() for v in values], 1)
    return ThoughtLogprobs(base, parts[0].target_valid, cat("after"), cat("thought"), cat("thought_mask"),
                           cat("row_targets"), cat("row_valid"), cat("thought_ids"), cat("predicted"), rows)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantage: torch.Tensor,
                      token_mask: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """Per thought, -(1/|c|) sum_u min(rho_u A, clip(rho_u, 1 - eps_low, 1 + eps_high) A):
    ``logp`` / ``old_logp`` [N, k] (the current policy's, with gradient / the sampling policy's),
    ``advantage`` [N] (detached here), ``token_mask`` [N, k] (the thought's own tokens, |c| of
    them). Returns [N]."""
    ratio = torch.exp(logp - old_logp.detach())                               # [N, k]
    adv = advantage.detach()[:, None]                                         # [N, 1]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    mask = token_mask.to(per_token.dtype)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)            # [N]


def prefix_match(predicted: torch.Tensor, continuation: torch.Tensor, valid: torch.Tensor,
                 token_strings: Callable[[Sequence[int]], Sequence[str]] | None) -> torch.Tensor:
    """RPT's reward: [N] bool, True where ``predicted`` [N]'s token text equals the concatenated
    texts of ``continuation`` [N, h]'s first j tokens for some j with all of them ``valid``
    [N, h]. ``token_strings`` maps ids to token texts; None: j = 1 only (equal ids). An id it
    has no text for (None: a head with more rows than the tokenizer has tokens, as padded
    vocabularies give) matches by id only."""
    hit = (predicted == continuation[:, 0]) & valid[:, 0]                     # j = 1
    if token_strings is None or continuation.shape[1] == 1:
        return hit
    ids = sorted(set(predicted.tolist()) | set(continuation.flatten().tolist()))
    text = dict(zip(ids, token_strings(ids)))
    hits = hit.tolist()
    for r, (p, cont, ok) in enumerate(zip(predicted.tolist(), continuation.tolist(), valid.tolist())):
        if text[p] is None:
            continue
        joined = ""
        for token, real in zip(cont, ok):
            if hits[r] or not real or text[token] is None or len(joined) >= len(text[p]):
                break
            joined += text[token]
            hits[r] = joined == text[p]
    return torch.tensor(hits, dtype=torch.bool, device=predicted.device)


@torch.no_grad()
def thought_health(thoughts: torch.Tensor, own: torch.Tensor, next_tokens: torch.Tensor,
                   counted: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """What the thoughts look like, from the step's own tensors (no extra pass): ``thoughts``
    [N*G, W, k] with ``own`` [N*G, W, k] (the thought's own ids), ``next_tokens`` [N*G, W] (the
    true x_{i+1} of each row), ``counted`` [N*G, W] (the thoughts that count), G = ``group``
    adjacent rows per text. Means over the counted thoughts (or their positions):

        leak_rate          share of thoughts that contain the next true token x_{i+1}: a thought
                           that writes the target earns a likelihood reward without reasoning
        thought_length     mean count of a thought's own tokens (k unless thoughts end early)
        distinct_thoughts  distinct thoughts among a position's G, over G (1: all differ)
    """
    GW = thoughts.shape[1]
    leak = ((thoughts == next_tokens[..., None]) & own).any(-1)               # [N*G, W]
    length = own.sum(-1).to(torch.float32)                                    # [N*G, W]
    ids = thoughts.masked_fill(~own, -1).view(-1, group, GW, thoughts.shape[-1])  # [N, G, W, k]
    same = (ids[:, :, None] == ids[:, None]).all(-1)                          # [N, G, G, W]: g equals g'
    earlier = torch.ones(group, group, dtype=torch.bool, device=ids.device).tril(-1)  # g' < g
    repeated = (same & earlier[None, :, :, None]).any(2)                      # [N, G, W]
    distinct = (~repeated).sum(1).to(torch.float32) / group                   # [N, W]
    return {"leak_rate": _masked_mean(leak.to(torch.float32), counted),
            "thought_length": _masked_mean(length, counted),
            "distinct_thoughts": _masked_mean(distinct, counted.view(-1, group, GW)[:, 0])}


def _ahead(logp: torch.Tensor, h: int) -> torch.Tensor:
    """[B, L] next-token log-likelihoods -> [B, L, h]: log p(x_{i+1+s}) sits at position i+s."""
    return torch.stack([F.pad(logp[:, s:], (0, s)) for s in range(h)], dim=-1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def successor_loss_terms(config: QuietStarConfig, logp: ThoughtLogprobs, *,
                         ema_base_logp: torch.Tensor | None = None,
                         token_strings: Callable[[Sequence[int]], Sequence[str]] | None = None,
                         old_thought_logp: torch.Tensor | None = None):
    """The RLP or RPT objective (``config.objective``) as (weighted next-token NLL term, the
    surrogate term, detached metrics). ``ema_base_logp`` [B*G, L] (rlp): log p_EMA(x_{i+1}) of
    the EMA copy, no thought. ``token_strings`` (rpt): ids -> token texts (``prefix_match``).
    ``old_thought_logp`` [B*G, W, k]: the sampling policy's log-probabilities when the thoughts
    serve a later update; None: this step sampled them (rho = 1).

    Metrics (the keys the training log, the progress bar and the held-out loss read):
        base_nll                  next-token NLL without a thought, every position
        thought_nll               NLL of x_{i+1} after the thought, at the positions that thought
        model_nll                 what the model predicts: after the thought where it thought,
                                  the base elsewhere, every position (compare with base_nll)
        policy_loss               the surrogate (unweighted)
        mean_reward               rlp: the information gain r; rpt: the share of exact predictions
        positive_reward_fraction  share of thoughts with r > 0 (rlp: thinking beat the EMA copy)
        reward_spread             std of r over a group, mean over positions (0: nothing to learn)
        thought_gain              mean of sum_s [log p_theta(after c) - log p_theta(no thought)]
        leak_rate, thought_length, distinct_thoughts   ``thought_health``
    """
    G = config.thoughts_per_position
    BG, W, h = logp.after.shape
    L = logp.base.shape[1]
    rows = logp.rows
    valid = logp.row_valid.to(logp.after.dtype)                               # [B*G, W, h]
    position_valid = logp.row_valid[..., 0]                                   # [B*G, W]: thoughts that count

    # 1. the reward of each thought, no gradient                              [B*G, W]
    base_ahead = _ahead(logp.base.detach(), h)                                # [B*G, L, h]
    base_rows = base_ahead if rows is None else rows.gather(base_ahead)       # [B*G, W, h]
    if config.objective == "rlp":
        if ema_base_logp is None:
            raise QuietStarInputError("objective='rlp' needs ema_base_logp, the EMA copy's log-likelihoods")
        ema_ahead = _ahead(ema_base_logp.detach(), h)
        ema_rows = ema_ahead if rows is None else rows.gather(ema_ahead)
        reward = information_gain(logp.after, ema_rows, valid)
    else:
        reward = prefix_match(logp.predicted.reshape(-1), logp.row_targets.reshape(-1, h),
                              logp.row_valid.reshape(-1, h), token_strings).view(BG, W).to(valid.dtype)

    # 2. the group advantage                                                  [B*G, W]
    grouped = reward.view(-1, G, W)                                           # [B, G, W]
    advantage = grouped - grouped.mean(1, keepdim=True)
    if config.objective == "rlp":
        advantage = advantage * (G / (G - 1))
    advantage = advantage.view(BG, W)

    # 3. the clipped surrogate on the thought tokens, mean over the thoughts that count
    k = logp.thought.shape[-1]
    old = logp.thought if old_thought_logp is None else old_thought_logp
    per_thought = clipped_surrogate(logp.thought.reshape(-1, k), old.reshape(-1, k), advantage.reshape(-1),
                                    logp.thought_mask.reshape(-1, k), config.clip_eps_low,
                                    config.clip_eps_high).view(BG, W)
    policy_loss = _masked_mean(per_thought, position_valid)

    # 4. the LM's own next-token NLL (a term only with next_token_loss_weight > 0)
    next_valid = logp.target_valid[..., 0]                                    # [B*G, L]
    base_nll = _masked_mean(-logp.base, next_valid)
    nll_term = config.next_token_loss_weight * base_nll

    after_1 = logp.after[..., 0]                                              # [B*G, W]
    model_logp = after_1 if rows is None else rows.put(after_1, logp.base.detach())  # [B*G, L]
    spread = grouped.std(1, correction=0)                                     # [B, W]
    metrics = {"base_nll": base_nll, "thought_nll": _masked_mean(-after_1, position_valid),
               "model_nll": _masked_mean(-model_logp, next_valid),
               "policy_loss": policy_loss,
               "mean_reward": _masked_mean(reward, position_valid),
               "positive_reward_fraction": _masked_mean((reward > 0).to(valid.dtype), position_valid),
               "reward_spread": _masked_mean(spread, position_valid.view(-1, G, W)[:, 0]),
               "thought_gain": _masked_mean(((logp.after - base_rows) * valid).sum(-1), position_valid),
               **thought_health(logp.thought_ids, logp.thought_mask, logp.row_targets[..., 0], position_valid, G)}
    return nll_term, policy_loss, {name: value.detach() for name, value in metrics.items()}
