"""The Quiet-STaR objective from log-likelihoods (computed by ``vocab.VocabHead``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import QuietStarConfig


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite value where the objective needs finite numbers."""


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def quietstar_loss(
    config: QuietStarConfig,
    base_logp: torch.Tensor,
    mixed_logp: torch.Tensor,
    thought_logp: torch.Tensor,
    target_valid: torch.Tensor,
    after_logp: torch.Tensor | None = None,
    ema_base_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective for n = ``config.thoughts_per_position`` thoughts per position: returns the
    loss and a dict of detached scalar metrics (what the training log, the progress bar and the
    held-out evaluation reduce, by key):

        base_nll                  next-token NLL without a thought
        mixed_nll, mixed_nll_<s>  NLL of the mixed prediction of x_{i+s} (s = 1..A), and its mean
        policy_loss               the REINFORCE term (unweighted)
        mean_reward               reward after the baseline (and clamping), mean over positions
        positive_reward_fraction  share of rewards > 0 before clamping
        thought_gain              mean over positions of sum_s [log p_mix - log p_base]: > 0 = thoughts help

    Rows are grouped as [B*n] with the n thoughts of a text adjacent. Shapes:
    base_logp [B*n, L] (log p_base(x_{i+1}) at position i), mixed_logp [B*n, L, A],
    thought_logp [B*n, L, k] (thought tokens at the REINFORCE temperature),
    target_valid [B*n, L, A] (x_{i+1+s} exists and is not ignored); with
    ``reward_source="thought"`` after_logp [B*n, L, A] (the post-thought prediction before
    mixing), with ``reward_baseline="ema_base"`` ema_base_logp [B*n, L] (as base_logp, from the
    EMA copy of the LM).
    """
    nll_term, policy_term, metrics = quietstar_loss_terms(config, base_logp, mixed_logp, thought_logp,
                                                          target_valid, after_logp, ema_base_logp)
    return nll_term + policy_term, metrics


def _ahead(logp: torch.Tensor, A: int) -> torch.Tensor:
    """[B, L] next-token log-likelihoods -> [B, L, A]: log p(x_{i+1+s}) sits at position i+s."""
    return torch.stack([F.pad(logp[:, s:], (0, s)) for s in range(A)], dim=-1)


def quietstar_loss_terms(config, base_logp, mixed_logp, thought_logp, target_valid,
                         after_logp=None, ema_base_logp=None):
    """``quietstar_loss`` as (weighted NLL terms, weighted REINFORCE term, metrics), for a
    caller that treats the two gradients apart (``TrainConfig.policy_max_grad_norm``)."""
    n = config.thoughts_per_position
    A = mixed_logp.shape[-1]
    L = base_logp.shape[1]

    base_nll = _masked_mean(-base_logp, target_valid[..., 0])
    mixed_nll = torch.stack([_masked_mean(-mixed_logp[..., s], target_valid[..., s]) for s in range(A)])

    # Rewards are log-likelihoods of the same A true tokens, summed, with no gradient.
    valid = target_valid.to(mixed_logp.dtype)
    position_valid = target_valid[..., 0]
    thought_ll = (mixed_logp.detach() * valid).sum(-1)                 # [B*n, L] mixed prediction
    base_ll = (_ahead(base_logp.detach(), A) * valid).sum(-1)          # [B*n, L] no thought
    if config.reward_source == "thought":
        if after_logp is None:
            raise ValueError("reward_source='thought' needs after_logp, the post-thought log-likelihoods")
        reward_ll = (after_logp.detach() * valid).sum(-1)
    else:
        reward_ll = thought_ll

    if config.reward_baseline == "thought_mean":
        grouped = reward_ll.view(-1, n, L)
        reward = (grouped - grouped.mean(1, keepdim=True)).view(-1, L)
    elif config.reward_baseline == "base":
        reward = reward_ll - base_ll
    else:
        if ema_base_logp is None:
            raise ValueError("reward_baseline='ema_base' needs ema_base_logp, the EMA copy's log-likelihoods")
        reward = reward_ll - (_ahead(ema_base_logp.detach(), A) * valid).sum(-1)
    positive = _masked_mean((reward > 0).float(), position_valid)
    if config.drop_negative_rewards:
        reward = reward.clamp(min=0)
    policy_loss = _masked_mean(-reward * thought_logp.mean(-1), position_valid)

    nll_term = config.base_loss_weight * base_nll + config.mixed_loss_weight * mixed_nll.mean()
    metrics = {"base_nll": base_nll, "mixed_nll": mixed_nll.mean(),
               **{f"mixed_nll_{s + 1}": mixed_nll[s] for s in range(A)},
               "policy_loss": policy_loss,
               "mean_reward": _masked_mean(reward, position_valid),
               "positive_reward_fraction": positive,
               "thought_gain": _masked_mean(thought_ll - base_ll, position_valid)}
    return nll_term, config.policy_loss_weight * policy_loss, {k: v.detach() for k, v in metrics.items()}
