"""The Quiet-STaR objective from log-likelihoods (``targets.StepLogprobs``, computed by
``vocab.VocabHead``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quietstar.method.config import QuietStarConfig
from quietstar.method.targets import StepLogprobs
from quietstar.utils.errors import QuietStarInputError


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite value where the objective needs finite numbers."""


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def quietstar_loss(config: QuietStarConfig, logp: StepLogprobs,
                   ema_base_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective for n = ``config.thoughts_per_position`` thoughts per position: returns the
    loss and a dict of detached scalar metrics (what the training log, the progress bar and the
    held-out evaluation reduce, by key):

        base_nll                  next-token NLL without a thought
        mixed_nll, mixed_nll_<s>  NLL of the mixed prediction of x_{i+s} (s = 1..A), and its mean,
                                  at the positions that thought
        model_nll                 next-token NLL of what the model predicts: the mixed prediction
                                  where the position thought, the base one elsewhere, over every
                                  position (= mixed_nll_1 when all think); compare with base_nll
        thought_nll               (thought_loss_weight > 0) mean NLL of the post-thought prediction
        policy_loss               the REINFORCE term (unweighted)
        mean_reward               reward after the baseline (and clamping), mean over positions
        positive_reward_fraction  share of rewards > 0 before clamping (with reward_baseline="base" /
                                  "ema_base": of thoughts that beat no thought; with "thought_mean"
                                  and two thoughts 0.5 by construction)
        reward_spread             std of the rewards (before clamping) over a position's n thoughts,
                                  mean over positions: how much the thoughts differ, what REINFORCE
                                  learns from (0 when they all score alike)
        thought_gain              mean over positions of sum_s [log p_mix - log p_base]: > 0 = thoughts help

    policy_loss and the three reward metrics count at the positions ``config.policy_positions``
    names ("reference": 0..L-2-A only), the NLLs and thought_gain at every position that thought.

    Rows are grouped as [B*n] with the n thoughts of a text adjacent. Of ``logp``: base
    [B*n, L] (log p_base(x_{i+1}) at position i), mixed [B*n, L, A], thought [B*n, L, k]
    (thought tokens at the REINFORCE temperature), target_valid [B*n, L, A] (x_{i+1+s} exists
    and is not ignored); with ``reward_source="thought"`` or ``thought_loss_weight > 0`` after
    [B*n, L, A] (the post-thought prediction before mixing). thought_valid [B*n, L, A] (None:
    target_valid): where the mixed NLL, the thought NLL, the rewards and REINFORCE count, i.e.
    at the positions that thought (``thought_fraction``); the other entries of mixed, thought and
    after are ignored. With ``reward_baseline="ema_base"``, ``ema_base_logp`` [B*n, L] (as base,
    from the EMA copy of the LM, not from the rollout). ``row_valid`` is not read.
    """
    nll_term, policy_term, metrics = quietstar_loss_terms(config, logp, ema_base_logp)
    return nll_term + policy_term, metrics


def _step_nlls(logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[..., A] log-likelihoods of the A ahead tokens -> [A] mean NLL of each step where valid."""
    return torch.stack([_masked_mean(-logp[..., s], valid[..., s]) for s in range(logp.shape[-1])])


def _ahead(logp: torch.Tensor, A: int) -> torch.Tensor:
    """[B, L] next-token log-likelihoods -> [B, L, A]: log p(x_{i+1+s}) sits at position i+s."""
    return torch.stack([F.pad(logp[:, s:], (0, s)) for s in range(A)], dim=-1)


def quietstar_loss_terms(config: QuietStarConfig, logp: StepLogprobs, ema_base_logp: torch.Tensor | None = None):
    """``quietstar_loss`` as (weighted NLL terms, weighted REINFORCE term, metrics), for a
    caller that treats the two gradients apart (``TrainConfig.policy_max_grad_norm``)."""
    base_logp, mixed_logp, thought_logp, after_logp = logp.base, logp.mixed, logp.thought, logp.after
    target_valid = logp.target_valid
    n = config.thoughts_per_position
    A = mixed_logp.shape[-1]
    L = base_logp.shape[1]

    base_nll = _masked_mean(-base_logp, target_valid[..., 0])
    thought_valid = target_valid if logp.thought_valid is None else logp.thought_valid  # where thoughts count
    mixed_nll = _step_nlls(mixed_logp, thought_valid)

    # Rewards are log-likelihoods of the same A true tokens, summed, with no gradient.
    valid = thought_valid.to(mixed_logp.dtype)
    position_valid = thought_valid[..., 0]
    policy_valid = position_valid  # where REINFORCE counts (config.policy_positions)
    if config.policy_positions == "reference":  # the reference code's slice: 0..L-2-A
        config.check_training_length(L)
        policy_valid = position_valid & (torch.arange(L, device=position_valid.device) < L - 1 - A)
    thought_ll = (mixed_logp.detach() * valid).sum(-1)                 # [B*n, L] mixed prediction
    base_ll = (_ahead(base_logp.detach(), A) * valid).sum(-1)          # [B*n, L] no thought
    if config.reward_source == "thought":
        if after_logp is None:
            raise QuietStarInputError("reward_source='thought' needs after_logp, the post-thought log-likelihoods")
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
            raise QuietStarInputError("reward_baseline='ema_base' needs ema_base_logp, the EMA copy's log-likelihoods")
        reward = reward_ll - (_ahead(ema_base_logp.detach(), A) * valid).sum(-1)
    positive = _masked_mean((reward > 0).float(), policy_valid)
    spread = _masked_mean(reward.view(-1, n, L).std(1, correction=0), policy_valid.view(-1, n, L)[:, 0])
    if config.drop_negative_rewards:
        reward = reward.clamp(min=0)
    policy_loss = _masked_mean(-reward * thought_logp.mean(-1), policy_valid)

    nll_term = config.base_loss_weight * base_nll + config.mixed_loss_weight * mixed_nll.mean()
    extra = {}
    if config.thought_loss_weight > 0:
        if after_logp is None:
            raise QuietStarInputError("thought_loss_weight > 0 needs after_logp, the post-thought log-likelihoods")
        thought_nll = _step_nlls(after_logp, thought_valid).mean()
        nll_term = nll_term + config.thought_loss_weight * thought_nll
        extra["thought_nll"] = thought_nll
    # What the model predicts at every position: mixed where it thought, base where it did not.
    model_logp = torch.where(thought_valid[..., 0], mixed_logp[..., 0].detach(), base_logp.detach())
    metrics = {"base_nll": base_nll, "model_nll": _masked_mean(-model_logp, target_valid[..., 0]),
               "mixed_nll": mixed_nll.mean(), **extra,
               **{f"mixed_nll_{s + 1}": mixed_nll[s] for s in range(A)},
               "policy_loss": policy_loss,
               "mean_reward": _masked_mean(reward, policy_valid),
               "positive_reward_fraction": positive,
               "reward_spread": spread,
               "thought_gain": _masked_mean(thought_ll - base_ll, position_valid)}
    return nll_term, config.policy_loss_weight * policy_loss, {k: v.detach() for k, v in metrics.items()}
