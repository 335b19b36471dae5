"""The reference code's definitions (docs/fidelity.md). With ``policy_positions="reference"``,
``meta_tokens_in_loss=True`` and ``mixing_head_bias=False`` a quietstar training step's loss and
gradients are those of the reference Quiet-STaR code (github.com/ezelikman/quiet-star,
modeling_mistral.py, ``MistralForCausalLM.forward``) on the same weights and thoughts, in float32.

The reference is written out here as that code computes it, pass by pass in its own slicing and
averaging, on a plain copy of the LM run position by position over x_0..x_i START t_1..t_k END
x_{i+1}..x_{i+A-1} (stock eager attention, none of quietstar's method code):

    loss_list[0]       CE of the text pass's logits (all V of them) at positions 0..L-2
    talk step s        CE of the mixed logits (all V) of x_{i+1+s} at positions 0..L-2-s
    loss               0.5 * nonzero-mean(loss_list[0]) + 0.5 * mean_s nonzero-mean(talk_s)
    policy_reward      sum_s (CE_base - CE_mixed)[:, :-(A - s)]: positions 0..L-2-A
    trice, clamp       minus the mean over the n thoughts of a text, then max(0, .)
    actor loss         mean over the k thought tokens of mean over the rows x positions
                       0..L-2-A of -reward * log_softmax(masked logits / 3)[token]
    total              loss + 1e6 * actor loss
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import make_lm, make_tokenizer, random_text
from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.method.losses import quietstar_loss
from quietstar.method.targets import StepLogprobs
from quietstar.training.config import TrainConfig, load_config, presets
from quietstar.utils.errors import QuietStarInputError

REFERENCE = dict(policy_positions="reference", meta_tokens_in_loss=True, mixing_head_bias=False)
K, A, N = 3, 3, 2  # thought tokens, ahead tokens, thoughts per position


def build(family: str, **settings) -> QuietStarForCausalLM:
    """A tiny fp32 model (its LM head has rows for the meta tokens, as the reference's resized
    one) with a live mixing head, so the thoughts change the prediction and the rewards differ."""
    config = QuietStarConfig(sampled_thought_tokens=K, ahead_tokens=A, thoughts_per_position=N, **settings)
    model = QuietStarForCausalLM.from_base(make_lm(family), make_tokenizer(), config)
    assert max(model.start_id, model.end_id) < model.lm.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.train()


def plain_run(ref: QuietStarForCausalLM, seq: torch.Tensor):
    """(final hidden states [T, d], logits [T, V] over the whole vocabulary) of the plain LM on
    one sequence, START/END embedded as their learned vectors."""
    table = ref.lm.get_input_embeddings()
    meta = ref.embedding.meta_vectors  # the scaled parameter x the learning-rate multiplier
    rows = [meta[0] if t == ref.start_id else meta[1] if t == ref.end_id else table(t.view(1))[0]
            for t in seq]
    out = ref.lm(inputs_embeds=torch.stack(rows)[None], output_hidden_states=True)
    return out.hidden_states[-1][0], out.logits[0]


def talk_head(ref: QuietStarForCausalLM, base_hidden, thought_hidden):
    """The reference's talk head: Linear-ReLU-Linear-ReLU-Linear(bias=False) -> w."""
    first, second, last = ref.mixing_head.mlp[0], ref.mixing_head.mlp[2], ref.mixing_head.mlp[4]
    assert last.bias is None
    h = torch.relu(F.linear(torch.cat([base_hidden, thought_hidden], -1), first.weight, first.bias))
    h = torch.relu(F.linear(h, second.weight, second.bias))
    return h @ last.weight.T


def reference_step(ref: QuietStarForCausalLM, text: torch.Tensor, thoughts: torch.Tensor):
    """The reference code's (NLL loss, actor loss) for one text [L] and its N thoughts [N, L, K]."""
    L = text.shape[0]
    head = ref.lm.get_output_embeddings().weight
    start, end = torch.tensor([ref.start_id]), torch.tensor([ref.end_id])
    base_hidden, base_logits = plain_run(ref, text)
    loss0 = torch.zeros(N, L - 1, dtype=head.dtype)
    talk = [torch.zeros(N, L - 1 - s, dtype=head.dtype) for s in range(A)]
    base_ce = [torch.zeros(N, L - 1 - s, dtype=head.dtype) for s in range(A)]
    action = [torch.zeros(N, L - 1, dtype=head.dtype) for _ in range(K)]
    for r in range(N):  # the reference repeats each text n times (repeat_interleave)
        loss0[r] = F.cross_entropy(base_logits[:L - 1], text[1:], reduction="none")
        for i in range(L):
            t = thoughts[r, i]
            seq = torch.cat([text[:i + 1], start, t, end, text[i + 1:i + A]])
            hidden, logits = plain_run(ref, seq)
            for j in range(K):  # the query at START + j samples t_{j+1}: masked, at temperature 3
                z = logits[i + 1 + j].clone()
                z[[ref.start_id, ref.end_id]] = -1e10
                if i < L - 1:
                    action[j][r, i] = F.log_softmax(z / 3, -1)[t[j]]
            after = i + K + 2  # END's index
            for s in range(A):
                if i > L - 2 - s:
                    continue
                w = talk_head(ref, base_hidden[i + s], hidden[after + s])
                mixed = base_hidden[i + s] * (1 - w) + hidden[after + s] * w
                talk[s][r, i] = F.cross_entropy((head @ mixed)[None], text[i + 1 + s].view(1))
                base_ce[s][r, i] = F.cross_entropy(base_logits[i + s][None], text[i + 1 + s].view(1))
    nonzero_mean = lambda x: x.sum() / (x != 0).sum()  # the reference's loss_mean
    loss = sum(nonzero_mean(talk[s]) for s in range(A)) * 0.5 / A + nonzero_mean(loss0) * 0.5
    reward = sum((base_ce[s].detach() - talk[s])[:, :L - 1 - A] for s in range(A))  # [:, :-(A - s)]
    reward = (reward - reward.mean(0, keepdim=True)).detach().clamp(min=0)        # trice, clamp
    actor = sum((-reward * action[j][:, :L - 1 - A]).mean() for j in range(K)) / K
    return loss, actor


def plain_copy(model: QuietStarForCausalLM) -> QuietStarForCausalLM:
    """A deep copy whose LM runs stock eager attention: none of quietstar's attention code."""
    ref = copy.deepcopy(model)
    ref.lm.set_attn_implementation("eager")
    return ref


# relative tolerances: (NLL term, policy loss, each parameter's gradient as a norm). A reward is
# the difference of two NLLs near 6, weighted 1e6 in the loss: float32 rounding moves the
# gradient by ~1e-4 of its norm; in float64 (RMSNorm still rounds to float32 inside) by ~1e-6.
TOLERANCES = {torch.float32: (2e-6, 2e-5, 1e-3), torch.float64: (1e-8, 2e-6, 2e-5)}


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: sliding window 7 < the length
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_settings_give_the_reference_codes_loss_and_gradients(family, dtype):
    model = build(family, **REFERENCE).to(dtype)
    ref = plain_copy(model)
    L = 12
    text = random_text(1, L, seed=2)[0]
    thoughts = random_text(N * L, K, seed=3).view(N, L, K)
    loss, actor = reference_step(ref, text, thoughts)
    out = model(text[None], thought_ids=thoughts[None])
    assert actor > 1e-3  # REINFORCE is exercised: the thoughts' rewards differ
    nll_tol, policy_tol, grad_tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.terms["nll"], loss, rtol=nll_tol, atol=0)
    torch.testing.assert_close(out.metrics["policy_loss"].to(dtype), actor.detach(), rtol=policy_tol, atol=0)
    torch.testing.assert_close(out.loss, loss + 1e6 * actor, rtol=policy_tol, atol=0)
    out.loss.backward()
    (loss + 1e6 * actor).backward()
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = theirs[name].grad
        assert p.grad is not None and want is not None and want.norm() > 0, name
        assert (p.grad - want).norm() <= grad_tol * want.norm(), name


@pytest.mark.parametrize("today", ["policy_positions", "meta_tokens_in_loss", "all"])
def test_each_reference_setting_is_needed(today):
    """Leaving a setting at today's default changes the loss: each one is a real difference
    (the mixing head's bias starts at 0, so it changes no loss at the same weights)."""
    settings = {} if today == "all" else {**REFERENCE, today: getattr(QuietStarConfig(), today)}
    model = build("llama", **settings)
    ref = plain_copy(build("llama", **REFERENCE))
    L = 10
    text = random_text(1, L, seed=4)[0]
    thoughts = random_text(N * L, K, seed=5).view(N, L, K)
    with torch.no_grad():
        ref.mixing_head.mlp[-1].weight.copy_(model.mixing_head.mlp[-1].weight)
        loss, actor = reference_step(ref, text, thoughts)
        out = model(text[None], thought_ids=thoughts[None])
    if today in ("meta_tokens_in_loss", "all"):
        assert (out.terms["nll"] - loss).abs() > 1e-3  # ~2/V: the meta tokens' share of the softmax
    if today in ("policy_positions", "all"):
        assert (out.metrics["policy_loss"] - actor).abs() > 1e-3 * actor.abs()


def test_reference_positions_by_hand_with_padding_and_a_chosen_share():
    """policy_positions="reference" counts REINFORCE at positions 0..L-2-A of the batch (L its
    padded length) that thought and have a target: padding and positions that did not think
    stay out of the mean, as under "partial"."""
    L = 8
    g = torch.Generator().manual_seed(0)
    base = -torch.rand(2 * N, L, generator=g)
    mixed = -torch.rand(2 * N, L, A, generator=g)
    thought = -torch.rand(2 * N, L, K, generator=g)
    # text 0: 8 tokens; text 1: right-padded to 8 from 6 (its targets stop at x_5)
    lengths = [8, 8, 6, 6]
    valid = torch.tensor([[[i + 1 + s < n_ for s in range(A)] for i in range(L)] for n_ in lengths])
    thought_valid = valid.clone()
    thought_valid[:, 1] = False  # position 1 did not think
    results = {}
    for rule in ("partial", "reference"):
        cfg = QuietStarConfig(sampled_thought_tokens=K, ahead_tokens=A, thoughts_per_position=N,
                              policy_positions=rule, policy_loss_weight=1.0)
        _, metrics = quietstar_loss(cfg, StepLogprobs(base, mixed, thought, valid, valid,
                                                      thought_valid=thought_valid))
        results[rule] = metrics
    # by hand
    ll = (mixed * thought_valid).sum(-1).view(2, N, L)
    reward = (ll - ll.mean(1, keepdim=True)).view(-1, L).clamp(min=0)
    term = -reward * thought.mean(-1)
    counted = {"partial": thought_valid[..., 0],
               "reference": thought_valid[..., 0] & (torch.arange(L) <= L - 2 - A)}
    for rule, where in counted.items():
        torch.testing.assert_close(results[rule]["policy_loss"], term[where].mean())
        torch.testing.assert_close(results[rule]["mean_reward"], reward[where].mean())
    assert counted["reference"].sum() == 4 * 3  # positions 0, 2, 3 of every row
    # the NLLs and thought_gain do not depend on the rule
    for name in ("base_nll", "mixed_nll", "thought_gain", "model_nll"):
        torch.testing.assert_close(results["partial"][name], results["reference"][name])


def test_reference_positions_need_a_position():
    """With L < A + 2 the reference's slice is empty: refused where the length enters (the
    training config's seq_len, a training step's batch) instead of a silent zero policy loss."""
    model = build("llama", policy_positions="reference")
    with pytest.raises(QuietStarInputError, match=r"sequence length 4 must be at least ahead_tokens \+ 2 = 5"):
        model(random_text(1, A + 1))
    model(random_text(1, A + 2))  # one position: fine
    build("llama")(random_text(1, A + 1))  # "partial": every position with a target
    with pytest.raises(QuietStarInputError, match="TrainConfig: seq_len 5 must be at least ahead_tokens"):
        TrainConfig(seq_len=5, quietstar=QuietStarConfig(ahead_tokens=4, policy_positions="reference"))
    TrainConfig(seq_len=6, quietstar=QuietStarConfig(ahead_tokens=4, policy_positions="reference"))
    with pytest.raises(QuietStarInputError, match="TrainConfig: seq_len 4 must exceed ahead_tokens 4"):
        TrainConfig(seq_len=4)


def test_meta_tokens_in_loss_changes_only_the_losses_softmax():
    """The NLLs and rewards take the meta tokens' share of the softmax; the REINFORCE
    log-probabilities, sampling, scoring and generation keep them masked."""
    text = random_text(1, 10, seed=6)
    thoughts = random_text(N * 10, K, seed=7).view(1, N, 10, K)
    masked, full = build("llama"), build("llama", meta_tokens_in_loss=True)
    with torch.no_grad():
        a, b = masked(text, thought_ids=thoughts), full(text, thought_ids=thoughts)
        _, logits = plain_run(plain_copy(full), text[0])  # every row of the LM head
        nll = F.cross_entropy(logits[:-1], text[0, 1:])
    torch.testing.assert_close(b.metrics["base_nll"], nll)
    V = logits.shape[-1]
    assert 0 < b.metrics["base_nll"] - a.metrics["base_nll"] < 3 / V  # about 2/V: two more tokens
    # the thought tokens' REINFORCE log-probabilities and the public logits are unchanged
    scores_a = masked.score_thoughts(text, thoughts[:, 0])
    scores_b = full.score_thoughts(text, thoughts[:, 0])
    assert torch.equal(scores_a.mixed_logits, scores_b.mixed_logits)
    assert torch.isinf(scores_b.base_logits[..., [full.start_id, full.end_id]]).all()


@pytest.mark.parametrize("in_loss", [False, True])
def test_ema_baseline_uses_the_losses_softmax(in_loss):
    """A fresh EMA copy is the LM itself, so its information gain equals the "base" baseline's
    reward, whichever softmax the losses use (the copy's log-likelihoods take the same one)."""
    x = random_text(1, 8, seed=4)
    thoughts = random_text(N * 8, K, seed=5).view(1, N, 8, K)
    common = dict(reward_source="thought", drop_negative_rewards=False, meta_tokens_in_loss=in_loss)
    a = build("llama", reward_baseline="base", **common)(x, thought_ids=thoughts)
    b = build("llama", reward_baseline="ema_base", **common)(x, thought_ids=thoughts)
    for name in ("mean_reward", "positive_reward_fraction", "policy_loss"):
        torch.testing.assert_close(b.metrics[name], a.metrics[name], atol=1e-6, rtol=1e-6)


def test_mixing_head_without_bias_saves_and_loads(tmp_path):
    model = build("llama", mixing_head_bias=False)
    assert "mixing_head.mlp.4.bias" not in dict(model.named_parameters())
    assert "mixing_head.mlp.4.bias" in dict(build("llama").named_parameters())
    model.save_pretrained(tmp_path / "m")
    back = QuietStarForCausalLM.from_pretrained(tmp_path / "m")
    assert back.config.mixing_head_bias is False and back.mixing_head.mlp[-1].bias is None
    torch.testing.assert_close(back.mixing_head.mlp[-1].weight, model.mixing_head.mlp[-1].weight)
    # a head saved with a bias does not fit a config without one, and says so
    build("llama").save_pretrained(tmp_path / "with-bias")
    config = tmp_path / "with-bias" / "quietstar_config.json"
    config.write_text(config.read_text().replace('"mixing_head_bias": true', '"mixing_head_bias": false'))
    with pytest.raises(QuietStarInputError, match="does not fit this model"):
        QuietStarForCausalLM.from_pretrained(tmp_path / "with-bias")


def test_paper_preset_uses_the_reference_definitions():
    """The paper's run: the method's defaults (the paper's values) and, where the paper is
    silent, the reference code's definitions."""
    assert "paper" in presets()
    config = load_config("paper")
    method = config.quietstar
    assert (method.policy_positions, method.meta_tokens_in_loss, method.mixing_head_bias) == \
        ("reference", True, False)
    # the rest of the method is the paper's: QuietStarConfig's defaults
    defaults = QuietStarConfig()
    for name in ("sampled_thought_tokens", "ahead_tokens", "thoughts_per_position", "policy_loss_weight",
                 "base_loss_weight", "mixed_loss_weight", "policy_logprob_temperature",
                 "meta_token_lr_multiplier", "thought_temperature"):
        assert getattr(method, name) == getattr(defaults, name), name
    assert (config.seq_len, config.batch_size, config.learning_rate, config.max_steps) == (256, 8, 1e-6, 100)
