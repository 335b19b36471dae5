"""quietstar_loss by value: rewards, baselines, clamping, masking, weighting and gradients against
a reference written out here in plain Python loops over lists of floats (no quietstar code)."""

from __future__ import annotations

import pytest
import torch

from quietstar import QuietStarConfig
from quietstar.method.losses import quietstar_loss
from quietstar.method.targets import StepLogprobs

WEIGHTS = dict(base_loss_weight=0.25, mixed_loss_weight=0.75, policy_loss_weight=2.0)


def step(base, mixed, thought, valid, thought_valid=None) -> StepLogprobs:
    """The loss's input when every position is a thought row (row_valid = target_valid)."""
    return StepLogprobs(base, mixed, thought, valid, valid, thought_valid=thought_valid)


def valid_from_labels(label_valid: list[list[bool]], A: int) -> list[list[list[bool]]]:
    """target_valid[b][i][s]: x_{i+1+s} lies inside the text and its label is not ignored."""
    L = len(label_valid[0])
    return [[[i + 1 + s < L and row[i + 1 + s] for s in range(A)] for i in range(L)]
            for row in label_valid]


def reference(n, baseline, drop, base, mixed, thought, valid, base_w, mixed_w, policy_w):
    """The objective of quietstar_loss's docstring, element by element. Rows are [B*n] with the
    n thoughts of a text adjacent. Returns (loss, metrics, rewards before clamping, and the
    gradients of the loss w.r.t. base, mixed and thought, as nested lists)."""
    R, L, A, k = len(mixed), len(mixed[0]), len(mixed[0][0]), len(thought[0][0])
    count0 = sum(valid[r][i][0] for r in range(R) for i in range(L))
    count = [sum(valid[r][i][s] for r in range(R) for i in range(L)) for s in range(A)]

    thought_ll = [[sum(mixed[r][i][s] for s in range(A) if valid[r][i][s]) for i in range(L)]
                  for r in range(R)]
    # the base model's log-likelihood of the same A tokens: log p_base(x_{i+1+s}) is base[r][i+s]
    base_ll = [[sum(base[r][i + s] for s in range(A) if valid[r][i][s]) for i in range(L)]
               for r in range(R)]
    reward = [[0.0] * L for _ in range(R)]
    for r in range(R):
        first = r - r % n  # the first row of this text's n thoughts
        for i in range(L):
            if baseline == "thought_mean":
                mean = sum(thought_ll[first + j][i] for j in range(n)) / n
                reward[r][i] = thought_ll[r][i] - mean
            else:
                reward[r][i] = thought_ll[r][i] - base_ll[r][i]
    used = [[max(x, 0.0) if drop else x for x in row] for row in reward]

    def over_positions(f):
        return sum(f(r, i) for r in range(R) for i in range(L) if valid[r][i][0]) / count0

    def spread(r, i):  # the standard deviation of the n rewards at this text's position i
        values = [reward[r - r % n + j][i] for j in range(n)]
        mean = sum(values) / n
        return (sum((v - mean) ** 2 for v in values) / n) ** 0.5

    base_nll = over_positions(lambda r, i: -base[r][i])
    mixed_nll = [sum(-mixed[r][i][s] for r in range(R) for i in range(L) if valid[r][i][s]) / count[s]
                 for s in range(A)]
    policy = over_positions(lambda r, i: -used[r][i] * sum(thought[r][i]) / k)
    loss = base_w * base_nll + mixed_w * sum(mixed_nll) / A + policy_w * policy
    metrics = {"base_nll": base_nll, "model_nll": over_positions(lambda r, i: -mixed[r][i][0]),
               "mixed_nll": sum(mixed_nll) / A,
               **{f"mixed_nll_{s + 1}": mixed_nll[s] for s in range(A)},
               "policy_loss": policy,
               "mean_reward": over_positions(lambda r, i: used[r][i]),
               "positive_reward_fraction": over_positions(lambda r, i: float(reward[r][i] > 0)),
               "reward_spread": over_positions(spread),
               "thought_gain": over_positions(lambda r, i: thought_ll[r][i] - base_ll[r][i])}
    # Rewards are constants to the gradient: mixed and base get only their NLL terms' gradient.
    d_base = [[-base_w / count0 if valid[r][i][0] else 0.0 for i in range(L)] for r in range(R)]
    d_mixed = [[[-mixed_w / A / count[s] if valid[r][i][s] else 0.0 for s in range(A)]
                for i in range(L)] for r in range(R)]
    d_thought = [[[-policy_w * used[r][i] / k / count0 if valid[r][i][0] else 0.0 for _ in range(k)]
                  for i in range(L)] for r in range(R)]
    return loss, metrics, reward, (d_base, d_mixed, d_thought)


def check(n, baseline, drop, base, mixed, thought, valid):
    """quietstar_loss equals the reference: loss, every metric, every gradient. Returns the
    reference's rewards before clamping."""
    config = QuietStarConfig(thoughts_per_position=n, reward_baseline=baseline,
                             drop_negative_rewards=drop, ahead_tokens=len(mixed[0][0]),
                             sampled_thought_tokens=len(thought[0][0]), **WEIGHTS)
    tensors = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (base, mixed, thought)]
    loss, metrics = quietstar_loss(config, step(*tensors, torch.tensor(valid)))
    ref_loss, ref_metrics, reward, ref_grads = reference(
        n, baseline, drop, base, mixed, thought, valid,
        WEIGHTS["base_loss_weight"], WEIGHTS["mixed_loss_weight"], WEIGHTS["policy_loss_weight"])
    torch.testing.assert_close(loss, torch.tensor(ref_loss, dtype=torch.float64), atol=1e-12, rtol=1e-12)
    assert metrics.keys() == ref_metrics.keys()
    for name, value in ref_metrics.items():
        assert not metrics[name].requires_grad, name
        # The fraction is counted in float32 whatever the inputs' dtype: float32 rounding.
        tol = 1e-7 if name == "positive_reward_fraction" else 1e-12
        torch.testing.assert_close(metrics[name].double(), torch.tensor(value, dtype=torch.float64),
                                   atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    grads = torch.autograd.grad(loss, tensors)
    for name, got, want in zip(("base_logp", "mixed_logp", "thought_logp"), grads, ref_grads):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=1e-12,
                                   msg=f"d loss / d {name}")
    return reward


# B = 2 texts, n = 2 thoughts each (rows 0, 1: text 0; rows 2, 3: text 1), L = 4, A = 2, k = 2.
# Text 0 has every label; text 1 ignores the label of x_2 (-100), so its position 1 has no valid
# next token (left out of every position mean) but a valid x_3 at s = 1, which still counts in
# its thoughts' log-likelihood. Position 2 has no x_4 (s = 1 is beyond the text), position 3 no
# target at all. Entries without a valid target hold -9 / -7 / -5: they must not matter.
N = 2
LABELS = [[True, True, True, True], [True, True, False, True]]  # per text: label of x_j kept
VALID = [row for row in valid_from_labels(LABELS, 2) for _ in range(N)]
BASE = [  # log p_base(x_{i+1}) at position i (equal within a text: the base model sees no thought)
    [-1.0, -2.0, -0.5, -9.0], [-1.0, -2.0, -0.5, -9.0],
    [-1.5, -9.0, -0.25, -9.0], [-1.5, -9.0, -0.25, -9.0],
]
MIXED = [  # log p_mix(x_{i+1+s}) at position i, step s
    [[-0.5, -1.0], [-2.0, -1.0], [-0.5, -7.0], [-7.0, -7.0]],
    [[-1.5, -2.0], [-1.0, -2.0], [-0.25, -7.0], [-7.0, -7.0]],
    [[-1.0, -7.0], [-7.0, -0.5], [-0.25, -7.0], [-7.0, -7.0]],
    [[-2.0, -7.0], [-7.0, -1.5], [-0.75, -7.0], [-7.0, -7.0]],
]
THOUGHT = [  # log-probabilities of the k thought tokens at position i
    [[-0.5, -1.5], [-1.0, -1.0], [-2.0, -0.5], [-5.0, -5.0]],
    [[-1.0, -0.5], [-0.5, -2.5], [-1.5, -1.5], [-5.0, -5.0]],
    [[-0.25, -0.75], [-5.0, -5.0], [-1.0, -2.0], [-5.0, -5.0]],
    [[-3.0, -1.0], [-5.0, -5.0], [-0.5, -0.5], [-5.0, -5.0]],
]


def test_valid_targets_of_the_hand_example():
    assert VALID[0] == VALID[1] == [[True, True], [True, True], [True, False], [False, False]]
    assert VALID[2] == VALID[3] == [[True, False], [False, True], [True, False], [False, False]]


@pytest.mark.parametrize("drop", [True, False], ids=["clamped", "signed"])
@pytest.mark.parametrize("baseline", ["thought_mean", "base"])
def test_quietstar_loss_equals_hand_computed_reference(baseline, drop):
    reward = check(N, baseline, drop, BASE, MIXED, THOUGHT, VALID)
    # The example exercises every case at positions that count: rewards > 0 (kept), < 0 (clamped
    # or not) and exactly 0 (a tie between the two thoughts: not counted as positive).
    at_valid = [reward[r][i] for r in range(len(VALID)) for i in range(4) if VALID[r][i][0]]
    assert min(at_valid) < 0 < max(at_valid)
    if baseline == "thought_mean":
        assert 0.0 in at_valid
    else:  # text 0, position 2: the first thought equals the base model, the second beats it
        assert reward[0][2] == 0.0 and reward[1][2] == 0.25


def test_hand_example_rewards_by_value():
    """A few rewards worked out on paper, so the reference itself is pinned down."""
    reward = reference(N, "thought_mean", True, BASE, MIXED, THOUGHT, VALID, 1, 1, 1)[2]
    # text 0, position 0: log-likelihoods -1.5 and -3.5, mean -2.5
    assert reward[0][0] == 1.0 and reward[1][0] == -1.0
    # text 0, position 1: -3.0 and -3.0, a tie
    assert reward[0][1] == 0.0 and reward[1][1] == 0.0
    # text 1, position 1 (no valid x_2, valid x_3): -0.5 and -1.5 -> +0.5, -0.5 (not counted)
    assert reward[2][1] == 0.5 and reward[3][1] == -0.5
    reward = reference(N, "base", True, BASE, MIXED, THOUGHT, VALID, 1, 1, 1)[2]
    # text 0, position 0, first thought: -1.5 against the base model's -1.0 + -2.0
    assert reward[0][0] == 1.5
    # text 1, position 0: only x_1 is valid: -1.0 against -1.5
    assert reward[2][0] == 0.5


@pytest.mark.parametrize("baseline", ["thought_mean", "base"])
def test_reward_spread_of_the_hand_example_by_value(baseline):
    """The spread of the two thoughts' rewards, worked out on paper: text 0, positions 0-2:
    rewards +-1 (std 1), a tie (0), -0.5 vs -0.25 (0.125); text 1, positions 0 and 2: 0.5 and
    0.25 (position 1 has no valid next token). Mean 1.875 / 5; the baseline shifts both rewards
    of a position alike, so it does not change the spread, and clamping (after it) neither."""
    config = QuietStarConfig(thoughts_per_position=N, reward_baseline=baseline, ahead_tokens=2,
                             sampled_thought_tokens=2, drop_negative_rewards=True)
    tensors = [torch.tensor(x, dtype=torch.float64) for x in (BASE, MIXED, THOUGHT)]
    _, metrics = quietstar_loss(config, step(*tensors, torch.tensor(VALID)))
    assert metrics["reward_spread"].item() == pytest.approx(0.375, abs=1e-12)


@pytest.mark.parametrize("drop", [True, False], ids=["clamped", "signed"])
@pytest.mark.parametrize("baseline", ["thought_mean", "base"])
def test_quietstar_loss_equals_reference_on_random_inputs(baseline, drop):
    """Three thoughts per position (the mean baseline is not symmetric), A = 3, k = 4, 3 texts."""
    g = torch.Generator().manual_seed(0)
    B, n, L, A, k = 3, 3, 6, 3, 4
    labels = (torch.rand(B, L, generator=g) > 0.25).tolist()
    valid = [row for row in valid_from_labels(labels, A) for _ in range(n)]
    base = (-torch.rand(B, L, generator=g) * 3).repeat_interleave(n, 0).tolist()
    mixed = (-torch.rand(B * n, L, A, generator=g) * 3).tolist()
    thought = (-torch.rand(B * n, L, k, generator=g) * 3).tolist()
    check(n, baseline, drop, base, mixed, thought, valid)


def test_model_nll_mixes_where_positions_thought_and_is_base_elsewhere():
    """With only some positions thinking (``thought_valid``), model_nll is the NLL of what the
    model predicts at every position with a next token: the mixed prediction where it thought,
    the base one elsewhere; mixed_nll_1 covers the thinking positions only. Hand example: only
    position 0 thinks. Text 0 (positions 0-2 valid): rows 0/1 mixed -0.5 / -1.5 at 0, base -2.0
    and -0.5 at 1, 2; text 1 (positions 0, 2): mixed -1.0 / -2.0, base -0.25."""
    config = QuietStarConfig(thoughts_per_position=N, ahead_tokens=2, sampled_thought_tokens=2)
    tensors = [torch.tensor(x, dtype=torch.float64) for x in (BASE, MIXED, THOUGHT)]
    valid = torch.tensor(VALID)
    thought_valid = valid.clone()
    thought_valid[:, 1:] = False
    _, metrics = quietstar_loss(config, step(*tensors, valid, thought_valid))
    model_nll = (0.5 + 2.0 + 0.5 + 1.5 + 2.0 + 0.5 + 1.0 + 0.25 + 2.0 + 0.25) / 10
    assert metrics["model_nll"].item() == pytest.approx(model_nll, abs=1e-12)
    assert metrics["mixed_nll_1"].item() == pytest.approx((0.5 + 1.5 + 1.0 + 2.0) / 4, abs=1e-12)
    assert metrics["base_nll"].item() == pytest.approx((1 + 2 + 0.5 + 1 + 2 + 0.5 + 1.5 + 0.25 + 1.5 + 0.25) / 10)


def test_no_valid_target_gives_a_finite_zero_loss():
    """A micro-batch of padding only: every term is 0 (no 0/0), and no gradient."""
    config = QuietStarConfig(thoughts_per_position=2, ahead_tokens=2, sampled_thought_tokens=2)
    tensors = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (BASE, MIXED, THOUGHT)]
    loss, metrics = quietstar_loss(config, step(*tensors, torch.zeros(4, 4, 2, dtype=torch.bool)))
    assert loss.item() == 0.0
    assert all(value.item() == 0.0 for value in metrics.values())
    assert all((g == 0).all() for g in torch.autograd.grad(loss, tensors))
