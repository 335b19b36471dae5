"""Reward options of the method: where the reward comes from (mixed or the thought alone), the
information-gain baseline against an EMA copy of the LM (RLP), and policy and NLL gradients
clipped apart. Each against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_model, random_text
from quietstar import QuietStarConfig
from quietstar.method.losses import quietstar_loss, quietstar_loss_terms
from quietstar.method.targets import StepLogprobs


def toy(seed=0):
    """One text, n = 2 thoughts, L = 3, A = 2, k = 2; the last position has no target."""
    g = torch.Generator().manual_seed(seed)
    base = -torch.rand(2, 3, generator=g) * 3
    mixed = -torch.rand(2, 3, 2, generator=g) * 3
    after = -torch.rand(2, 3, 2, generator=g) * 3
    ema = -torch.rand(2, 3, generator=g) * 3
    thought = (-torch.rand(2, 3, 2, generator=g) * 3).requires_grad_()
    valid = torch.tensor([[True, True], [True, False], [False, False]]).expand(2, 3, 2)
    return base, mixed, after, ema, thought, valid


def step(base, mixed, thought, valid, after=None) -> StepLogprobs:
    """The loss's input when every position is a thought row (row_valid = target_valid)."""
    return StepLogprobs(base, mixed, thought, valid, valid, after)


def hand_rewards(cfg, base, mixed, after, ema, valid):
    """Rewards [n, L] written out position by position."""
    source = after if cfg.reward_source == "thought" else mixed
    rewards = [[0.0] * 3 for _ in range(2)]
    for r in range(2):
        for i in range(3):
            ll = sum(source[r, i, s].item() for s in range(2) if valid[r, i, s])
            if cfg.reward_baseline == "thought_mean":
                other = sum(source[1 - r, i, s].item() for s in range(2) if valid[1 - r, i, s])
                rewards[r][i] = ll - (ll + other) / 2
            else:
                ref = base if cfg.reward_baseline == "base" else ema
                rewards[r][i] = ll - sum(ref[r, i + s].item() for s in range(2) if valid[r, i, s])
    if cfg.drop_negative_rewards:
        rewards = [[max(0.0, x) for x in row] for row in rewards]
    return rewards


@pytest.mark.parametrize("source", ["mixed", "thought"])
@pytest.mark.parametrize("baseline", ["thought_mean", "base", "ema_base"])
@pytest.mark.parametrize("clamp", [True, False])
def test_rewards_and_policy_loss_by_hand(source, baseline, clamp):
    cfg = QuietStarConfig(reward_source=source, reward_baseline=baseline, drop_negative_rewards=clamp,
                          policy_loss_weight=3.0, ahead_tokens=2, sampled_thought_tokens=2)
    base, mixed, after, ema, thought, valid = toy()
    loss, metrics = quietstar_loss(cfg, step(base, mixed, thought, valid, after), ema_base_logp=ema)
    rewards = hand_rewards(cfg, base, mixed, after, ema, valid)
    positions = [(r, i) for r in range(2) for i in range(3) if valid[r, i, 0]]
    policy = sum(-rewards[r][i] * thought[r, i].mean().item() for r, i in positions) / len(positions)
    assert metrics["policy_loss"].item() == pytest.approx(policy, abs=1e-6)
    assert metrics["mean_reward"].item() == pytest.approx(
        sum(rewards[r][i] for r, i in positions) / len(positions), abs=1e-6)
    nll = 0.5 * (-base[valid[..., 0]].mean()) + 0.5 * torch.stack(
        [-mixed[..., s][valid[..., s]].mean() for s in range(2)]).mean()
    assert loss.item() == pytest.approx(nll.item() + 3.0 * policy, abs=1e-5)
    # The gradient reaches the thought tokens' log-probabilities only, scaled by their reward.
    (grad,) = torch.autograd.grad(loss, thought)
    for r in range(2):
        for i in range(3):
            expected = -3.0 * rewards[r][i] / 2 / len(positions) if (r, i) in positions else 0.0
            assert grad[r, i].tolist() == pytest.approx([expected] * 2, abs=1e-6)


def test_terms_add_up_to_the_loss_and_sources_need_their_inputs():
    cfg = QuietStarConfig(reward_source="thought", ahead_tokens=2)
    base, mixed, after, ema, thought, valid = toy()
    nll, policy, _ = quietstar_loss_terms(cfg, step(base, mixed, thought, valid, after))
    loss, _ = quietstar_loss(cfg, step(base, mixed, thought, valid, after))
    assert torch.equal(nll + policy, loss)
    with pytest.raises(ValueError, match="needs after_logp"):
        quietstar_loss(cfg, step(base, mixed, thought, valid))
    with pytest.raises(ValueError, match="needs ema_base_logp"):
        quietstar_loss(QuietStarConfig(reward_baseline="ema_base"), step(base, mixed, thought, valid))


@pytest.mark.parametrize("bad, message", [
    ({"reward_source": "base"}, "reward_source must be one of mixed, thought; got 'base'"),
    ({"reward_baseline": "ema"}, "reward_baseline must be one of thought_mean, base, ema_base; got 'ema'"),
    ({"ema_decay": 1.0}, "ema_decay must be in"),
    ({"ema_decay": -0.1}, "ema_decay must be in"),
])
def test_reward_settings_are_validated(bad, message):
    with pytest.raises(ValueError, match=message):
        QuietStarConfig(**bad)


def test_thought_reward_gives_a_signal_at_initialisation():
    """With the mixing weight 0 every thought earns the same mixed reward (0 after the mean
    baseline); the thought-alone reward differs between thoughts from the first step, and it is
    the post-thought log-likelihood of the A true tokens that score_thoughts gives."""
    x = random_text(1, 8, seed=3)
    mixed = make_model("llama", thoughts_per_position=2, drop_negative_rewards=False)
    out = mixed(x, generator=torch.Generator().manual_seed(0))
    assert out.metrics["mean_reward"].item() == 0.0 and out.metrics["positive_reward_fraction"].item() == 0.0
    alone = make_model("llama", thoughts_per_position=2, drop_negative_rewards=False,
                       reward_source="thought", policy_loss_weight=1.0)
    out = alone(x, generator=torch.Generator().manual_seed(0))
    assert 0.2 < out.metrics["positive_reward_fraction"].item() < 0.8
    # by hand from score_thoughts: reward = ll(thought) - mean over the two thoughts
    thoughts = out.thought_ids[0]
    with torch.no_grad():
        logp = alone.score_thoughts(x.repeat(2, 1), thoughts).thought_logits.log_softmax(-1)
    L, A = 8, alone.config.ahead_tokens
    ll = torch.zeros(2, L)
    for i in range(L):
        for s in range(A):
            if i + 1 + s < L:
                ll[:, i] += logp[:, i, s, x[0, i + 1 + s]]
    reward = ll - ll.mean(0, keepdim=True)
    assert out.metrics["positive_reward_fraction"].item() == pytest.approx(
        (reward[:, :L - 1] > 0).float().mean().item())
    assert out.metrics["mean_reward"].item() == pytest.approx(reward[:, :L - 1].mean().item(), abs=1e-6)


def test_thought_reward_is_a_constant_to_the_loss():
    """The thought-alone reward is a number, not a path for gradient: with ``after`` carrying a
    gradient (as it does when thought_loss_weight > 0 trains the post-thought prediction), the
    REINFORCE term sends none into it; its gradient to the thought log-probabilities is the
    hand-computed -reward / (k * positions)."""
    cfg = QuietStarConfig(reward_source="thought", reward_baseline="thought_mean", drop_negative_rewards=False,
                          policy_loss_weight=2.0, ahead_tokens=2, sampled_thought_tokens=2)
    base, mixed, after, ema, thought, valid = toy()
    after = after.clone().requires_grad_()
    _, policy, _ = quietstar_loss_terms(cfg, step(base, mixed, thought, valid, after))
    grad_after, grad_thought = torch.autograd.grad(policy, (after, thought), allow_unused=True)
    assert grad_after is None or not grad_after.any()
    rewards = hand_rewards(cfg, base, mixed, after, ema, valid)
    positions = [(r, i) for r in range(2) for i in range(3) if valid[r, i, 0]]
    for r in range(2):
        for i in range(3):
            expected = -2.0 * rewards[r][i] / 2 / len(positions) if (r, i) in positions else 0.0
            assert grad_thought[r, i].tolist() == pytest.approx([expected] * 2, abs=1e-6)


@pytest.mark.parametrize("thought_loss_weight", [0.0, 0.5])
def test_thought_reward_sends_no_gradient_into_the_language_model(monkeypatch, thought_loss_weight):
    """A training step with the thought-alone reward and the policy weight only (plus, second
    case, the post-thought NLL): the gradient on every parameter equals that of the REINFORCE
    estimator written out with the reward detached (and of the NLL term), from the step's own
    log-likelihoods. A reward left with its graph would add d(reward)/d(parameters)."""
    from quietstar.models import modeling

    model = make_model("llama", thoughts_per_position=2, reward_source="thought", drop_negative_rewards=False,
                       policy_loss_weight=1.0, base_loss_weight=0.0, mixed_loss_weight=0.0,
                       thought_loss_weight=thought_loss_weight)
    seen = {}

    def spy(cfg, logp, ema_base_logp=None):
        seen["logp"] = logp
        return quietstar_loss_terms(cfg, logp, ema_base_logp)

    monkeypatch.setattr(modeling, "quietstar_loss_terms", spy)
    out = model(random_text(1, 8, seed=3), generator=torch.Generator().manual_seed(0))
    logp = seen["logp"]
    valid = (logp.target_valid if logp.thought_valid is None else logp.thought_valid).float()
    ll = (logp.after.detach() * valid).sum(-1)                       # [n, L]: a constant
    reward = ll - ll.mean(0, keepdim=True)
    position = valid[..., 0]
    hand = (-reward * logp.thought.mean(-1) * position).sum() / position.sum()
    if thought_loss_weight:
        steps = [(-logp.after[..., s] * valid[..., s]).sum() / valid[..., s].sum() for s in range(valid.shape[-1])]
        hand = hand + thought_loss_weight * torch.stack(steps).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
    expected = torch.autograd.grad(hand, params, allow_unused=True)
    assert any(e is not None and e.abs().sum() > 0 for e in expected)  # the estimator reaches the LM
    for p, g, e in zip(params, got, expected):
        g = torch.zeros_like(p) if g is None else g
        e = torch.zeros_like(p) if e is None else e
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    if thought_loss_weight == 0:
        assert not logp.after.requires_grad  # the reward alone builds no graph through the head


def test_ema_baseline_starts_as_the_base_and_follows_the_lm():
    x = random_text(1, 8, seed=4)
    common = dict(thoughts_per_position=2, reward_source="thought", drop_negative_rewards=False)
    base = make_model("llama", reward_baseline="base", **common)
    ema = make_model("llama", reward_baseline="ema_base", ema_decay=0.75, **common)
    a = base(x, generator=torch.Generator().manual_seed(1))
    b = ema(x, generator=torch.Generator().manual_seed(1))
    # a fresh EMA copy is the LM itself: the information gain equals the base baseline's reward
    for name in ("mean_reward", "positive_reward_fraction", "policy_loss"):
        torch.testing.assert_close(b.metrics[name], a.metrics[name], atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in ema.ema_lm.parameters())
    before = {k: v.clone() for k, v in ema.ema_lm.state_dict().items()}
    with torch.no_grad():
        for p in ema.lm.parameters():
            p.add_(1.0)
    ema.update_ema_baseline()
    live = ema.lm.state_dict()
    for key, old in before.items():
        torch.testing.assert_close(ema.ema_lm.state_dict()[key], 0.75 * old + 0.25 * live[key])
    assert math.isfinite(ema(x, generator=torch.Generator().manual_seed(1)).loss.item())


def test_thought_loss_adds_the_post_thought_nll_by_hand():
    """thought_loss_weight adds the mean over the A steps of the unmixed post-thought NLL, with
    a gradient to after_logp (the mixed NLL alone gives it none while the mixing weight is 0)."""
    cfg = QuietStarConfig(thought_loss_weight=2.0, ahead_tokens=2, sampled_thought_tokens=2, policy_loss_weight=1.0)
    base, mixed, after, ema, thought, valid = toy()
    after = after.clone().requires_grad_()
    loss, metrics = quietstar_loss(cfg, step(base, mixed, thought, valid, after))
    without, _ = quietstar_loss(QuietStarConfig(ahead_tokens=2, sampled_thought_tokens=2, policy_loss_weight=1.0),
                                step(base, mixed, thought, valid))
    per_step = [-sum(after[r, i, s].item() for r in range(2) for i in range(3) if valid[r, i, s])
                / sum(1 for r in range(2) for i in range(3) if valid[r, i, s]) for s in range(2)]
    hand = sum(per_step) / 2
    assert metrics["thought_nll"].item() == pytest.approx(hand, abs=1e-6)
    assert loss.item() == pytest.approx(without.item() + 2.0 * hand, abs=1e-5)
    (grad,) = torch.autograd.grad(loss, after)
    counts = [valid[..., s].sum().item() for s in range(2)]
    for r in range(2):
        for i in range(3):
            expected = [-2.0 / 2 / counts[s] if valid[r, i, s] else 0.0 for s in range(2)]
            assert grad[r, i].tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="thought_loss_weight > 0 needs after_logp"):
        quietstar_loss(cfg, step(base, mixed, thought, valid))
    with pytest.raises(ValueError, match="thought_loss_weight must be finite and >= 0"):
        QuietStarConfig(thought_loss_weight=-1.0)


def test_thought_loss_trains_the_post_thought_prediction_at_initialisation():
    """At w = 0 the paper's objective sends no gradient through the post-thought prediction to
    the END embedding; with thought_loss_weight it does, and the metric equals score_thoughts'."""
    x = random_text(1, 8, seed=5)
    for weight in (0.0, 1.0):
        model = make_model("llama", thoughts_per_position=2, thought_loss_weight=weight,
                           policy_loss_weight=0.0)
        out = model(x, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        end_grad = model.embedding.scaled_vectors.grad[1].abs().sum().item()
        if weight == 0.0:
            assert end_grad == 0.0 and "thought_nll" not in out.metrics
            continue
        assert end_grad > 0.0
        with torch.no_grad():
            logp = model.score_thoughts(x.repeat(2, 1), out.thought_ids[0]).thought_logits.log_softmax(-1)
        L, A = 8, model.config.ahead_tokens
        steps = [torch.stack([-logp[r, i, s, x[0, i + 1 + s]] for r in range(2) for i in range(L) if i + 1 + s < L]).mean()
                 for s in range(A)]
        assert out.metrics["thought_nll"].item() == pytest.approx(torch.stack(steps).mean().item(), abs=1e-5)
