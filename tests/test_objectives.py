"""The objectives (quietstar, rlp, rpt) equal a hand-written reference that runs each chosen
position's prefix, thought and targets on their own through the plain model; their parts by hand.

Tolerance of the exact tests: 1e-5 absolute on the loss and on every parameter's gradient (of
the START/END vectors' true values: they are stored / 100, their stored gradients 100x, see
``meta_token_lr_multiplier``), on a tiny float32 model: the rollout's batched passes and the
plain model's one sequence differ by float32 rounding only, ~1e-7 here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_lm, make_tokenizer, random_text
from quietstar import QuietStarConfig, QuietStarForCausalLM, TrainConfig, train
from quietstar.method.objectives import clipped_surrogate, prefix_match, thought_health
from quietstar.training.config import load_config
from quietstar.utils.errors import QuietStarInputError

K, H, G = 3, 2, 3   # thought tokens, horizon (ahead_tokens), group size
ATOL = 1e-5


def build(objective: str, **kw) -> QuietStarForCausalLM:
    config = QuietStarConfig(objective=objective, sampled_thought_tokens=K, ahead_tokens=H,
                             thoughts_per_position=G, thought_temperature=0.7, **kw)
    model = QuietStarForCausalLM.from_base(make_lm("llama"), make_tokenizer(), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        last = model.mixing_head.mlp[-1]  # a mixing weight != 0, so "quietstar" mixes for real
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.5)
        last.bias.fill_(0.3)
        if config.uses_ema_copy:  # an EMA copy apart from the LM, so the reward is not trivial
            model.ema_baseline_enable()
            for p in model.ema_lm.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def text_batch(padding: str):
    """Two rows of 9 tokens; the second has 2 padding tokens on the ``padding`` side."""
    x = random_text(2, 9, seed=3)
    mask = torch.ones_like(x)
    if padding == "left":
        mask[1, :2] = 0
    elif padding == "right":
        mask[1, -2:] = 0
    x = x.masked_fill(mask == 0, 0)
    return x, mask


def chosen_positions(mask: torch.Tensor) -> torch.Tensor:
    """Three thinking positions per row, all with a next token (one of them the last such)."""
    positions = torch.zeros_like(mask, dtype=torch.bool)
    for b in range(mask.shape[0]):
        real = mask[b].nonzero().flatten().tolist()
        for j in (0, 3, len(real) - 2):
            positions[b, real[j]] = True
    return positions


def fixed_thoughts(B: int, L: int, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 300, (B, G, L, K), generator=g)


# ------------------------------------------------------------------ the reference
def masked_logits(model, logits: torch.Tensor, end_allowed: bool = False) -> torch.Tensor:
    """The plain model's logits with the meta tokens never predicted (as the wrapped model's);
    ``end_allowed``: END may be (a thought token where END ends a thought)."""
    V = logits.shape[-1]
    meta = [i for i in (model.start_id, model.end_id) if i < V and not (end_allowed and i == model.end_id)]
    return logits.index_fill(-1, torch.tensor(meta), float("-inf")) if meta else logits


def run_plain(model, seq: list[int], lm=None, end_allowed: bool = False):
    """The plain transformers model on one unpadded sequence: (logits [n, V], final hidden [n, d])."""
    lm = model.lm if lm is None else lm
    embed = model.get_input_embeddings() if lm is model.lm else lm.get_input_embeddings()
    out = lm(inputs_embeds=embed(torch.tensor(seq)[None]), output_hidden_states=True)
    return masked_logits(model, out.logits[0], end_allowed), out.hidden_states[-1][0]


def reference_loss(model, x, mask, thoughts, positions):
    """The objective of ``model.config`` written out position by position, thought by thought."""
    cfg = model.config
    T = cfg.thought_logprob_temperature
    prefix = list(model.thought_prefix_ids)
    m = len(prefix)
    stops = (model.end_id, model.tokenizer.eos_token_id) if cfg.thought_can_end else ()
    base_terms, by_position = [], []  # by_position: per (b, position) the G thoughts' numbers
    mixed_terms = [[] for _ in range(H)]
    for b in range(x.shape[0]):
        real_index = mask[b].nonzero().flatten().tolist()
        text = x[b, real_index].tolist()
        logits, hidden = run_plain(model, text)
        logp = logits.log_softmax(-1)
        base_terms += [logp[j, text[j + 1]] for j in range(len(text) - 1)]
        for p in positions[b].nonzero().flatten().tolist():
            j = real_index.index(p)
            group = []
            for g in range(G):
                c = thoughts[b, g, p].tolist()
                stop = next((u for u, t in enumerate(c) if t in stops), None)  # ends the thought
                own = c if stop is None else c[:stop]
                seq = text[:j + 1] + [model.start_id] + prefix + own + [model.end_id] + text[j + 1:j + H]
                t_logits, t_hidden = run_plain(model, seq)
                thought_logits = run_plain(model, seq, end_allowed=bool(stops))[0]
                u0 = j + 1 + m  # the output of START (or of the prefix's last token) predicts c[0]
                actions = K if stop is None else stop + 1  # the stop token is an action too
                thought_lp = torch.stack([(thought_logits[u0 + u] / T).log_softmax(-1)[c[u]]
                                          for u in range(actions)])
                after, mixed, ema, base_ahead, steps = [], [], [], [], []
                for s in range(H):
                    if j + 1 + s >= len(text):
                        break
                    target = text[j + 1 + s]
                    row = j + 2 + m + len(own) + s  # END's output (s = 0), then the teacher-forced tokens'
                    after.append(t_logits[row].log_softmax(-1)[target])
                    base_ahead.append(logp[j + s, target])
                    mixed_h, _ = model.mixing_head(hidden[j + s], t_hidden[row])
                    mixed.append(masked_logits(model, model.lm.get_output_embeddings()(mixed_h)
                                               ).log_softmax(-1)[target])
                    if cfg.objective == "rlp":
                        ema_logits, _ = run_plain(model, text[:j + 1 + s], lm=model.ema_lm)
                        ema.append(ema_logits[-1].log_softmax(-1)[target])
                    steps.append(s)
                predicted = int(t_logits[j + 2 + m + len(own)].argmax())
                group.append(dict(thought_lp=thought_lp, after=after, mixed=mixed, ema=ema,
                                  base_ahead=base_ahead, steps=steps, predicted=predicted,
                                  target=text[j + 1]))
            by_position.append(group)
    base_nll = -torch.stack(base_terms).mean()

    if cfg.objective == "quietstar":  # mixed reward, mean baseline, clamped, REINFORCE
        policy = []
        for group in by_position:
            rewards = [sum(m.item() for m in t["mixed"]) for t in group]
            mean = sum(rewards) / G
            for t, r in zip(group, rewards):
                for s, m in zip(t["steps"], t["mixed"]):
                    mixed_terms[s].append(-m)
                policy.append(-max(r - mean, 0.0) * t["thought_lp"].mean())
        mixed_nll = torch.stack([torch.stack(terms).mean() for terms in mixed_terms]).mean()
        return (cfg.base_loss_weight * base_nll + cfg.mixed_loss_weight * mixed_nll
                + cfg.policy_loss_weight * torch.stack(policy).mean())

    surrogate = []
    for group in by_position:
        if cfg.objective == "rlp":  # information gain, leave-one-out advantage
            rewards = [sum(a.item() - e.item() for a, e in zip(t["after"], t["ema"])) for t in group]
            mean = sum(rewards) / G
            advantages = [(r - mean) * G / (G - 1) for r in rewards]
        else:  # exact next-token prediction (j = 1 here), group baseline
            rewards = [float(t["predicted"] == t["target"]) for t in group]
            mean = sum(rewards) / G
            advantages = [r - mean for r in rewards]
        for t, adv in zip(group, advantages):
            lp = t["thought_lp"]
            ratio = torch.exp(lp - lp.detach())
            per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv)
            surrogate.append(per_token.mean())
    return torch.stack(surrogate).mean() + cfg.next_token_loss_weight * base_nll


def rpt_text_that_rewards(model, x, mask, thoughts, positions):
    """A copy of ``x`` whose next token after each chosen position is what the first thought of
    its group predicts greedily (so some thoughts earn 1 and the advantage is not all 0)."""
    x = x.clone()
    with torch.no_grad():
        for b in range(x.shape[0]):
            for p in positions[b].nonzero().flatten().tolist():  # in text order: later prefixes see it
                real_index = mask[b].nonzero().flatten().tolist()
                j = real_index.index(p)
                text = x[b, real_index].tolist()
                c = thoughts[b, 0, p].tolist()
                stops = (model.end_id, model.tokenizer.eos_token_id) if model.config.thought_can_end else ()
                own = c[:next((u for u, t in enumerate(c) if t in stops), len(c))]
                seq = text[:j + 1] + [model.start_id] + list(model.thought_prefix_ids) + own + [model.end_id]
                x[b, real_index[j + 1]] = int(run_plain(model, seq)[0][-1].argmax())
    return x


def grads_of(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True), params


def assert_equals_reference(model, objective, x, mask, thoughts, positions):
    """The step's loss and every gradient equal ``reference_loss``'s on the same thoughts; returns
    the step's output and how many parameters the reference's gradient moves."""
    if objective == "rpt":
        x = rpt_text_that_rewards(model, x, mask, thoughts, positions)
    out = model(x, mask, thought_ids=thoughts, thought_positions=positions)
    expected = reference_loss(model, x, mask, thoughts, positions)
    assert abs(out.loss.item() - expected.item()) < ATOL
    ours, params = grads_of(model, out.loss)
    theirs, _ = grads_of(model, expected)
    moved = 0
    for a, b, p in zip(ours, theirs, params):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        # START/END are stored / 100 (meta_token_lr_multiplier): their gradients are 100x, so is rounding
        scale = model.config.meta_token_lr_multiplier if p is model.embedding.scaled_vectors else 1.0
        torch.testing.assert_close(a, b, atol=ATOL * scale, rtol=0)
        moved += int(b.abs().max() > 1e-4)
    return out, moved


@pytest.mark.parametrize("objective,extra", [
    ("quietstar", {"policy_loss_weight": 1.0}),
    ("quietstar", {"policy_loss_weight": 1.0, "thought_prefix": "Q:"}),
    ("rlp", {}),
    ("rlp", {"next_token_loss_weight": 0.3}),
    ("rpt", {}),
])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_objective_equals_the_sequential_reference_with_gradients(objective, extra, padding):
    model = build(objective, **extra)
    x, mask = text_batch(padding)
    positions = chosen_positions(mask)
    out, moved = assert_equals_reference(model, objective, x, mask, fixed_thoughts(*x.shape), positions)
    assert moved > 0, "the reference has no gradient: the test would prove nothing"
    if objective == "rpt":
        assert 0 < out.metrics["mean_reward"] < 1


def ending_thoughts(model, B: int, L: int) -> torch.Tensor:
    """Fixed thoughts of which some end early: at END as their first token (an empty thought),
    at EOS as their second, at EOS as their last; the ids after a stop are arbitrary (not read)."""
    thoughts = fixed_thoughts(B, L)
    eos = model.tokenizer.eos_token_id
    thoughts[:, 0, ::3, 0] = model.end_id
    thoughts[:, 1, 1::3, 1] = eos
    thoughts[:, 2, ::2, K - 1] = eos
    return thoughts


@pytest.mark.parametrize("objective", ["rlp", "rpt"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("prefix", ["", "Q:"])
def test_early_ended_thoughts_and_a_prefix_equal_the_reference(objective, padding, prefix):
    """thought_can_end: a thought is its tokens before the first END / EOS, closed by END, the
    stop token's log-probability in the surrogate; thought_prefix: forced after START."""
    model = build(objective, thought_can_end=True, thought_prefix=prefix)
    assert len(model.thought_prefix_ids) == (2 if prefix else 0)
    x, mask = text_batch(padding)
    positions = chosen_positions(mask)
    assert_equals_reference(model, objective, x, mask, ending_thoughts(model, *x.shape), positions)


@pytest.mark.parametrize("objective", ["rlp", "rpt"])
def test_successors_train_the_thought_tokens_only(objective):
    """No next-token term (the default): the mixing head gets nothing and the LM's gradient comes
    through the thought tokens' log-probabilities alone (zero advantage: zero gradient)."""
    model = build(objective)
    x, mask = text_batch("none")
    out = model(x, mask, thought_ids=fixed_thoughts(*x.shape), thought_positions=chosen_positions(mask))
    out.loss.backward()
    assert all(p.grad is None for p in model.mixing_head.parameters())
    assert set(out.metrics) >= {"base_nll", "model_nll", "thought_gain", "mean_reward", "reward_spread",
                                "policy_loss", "positive_reward_fraction", "thought_nll"}


@pytest.mark.parametrize("objective", ["rlp", "rpt"])
def test_a_successor_model_predicts_from_its_own_thought_everywhere(objective):
    """rlp / rpt train the LM to read its own thought (no mixing head), so what the model predicts
    with a thought is the post-thought prediction (w = 1): in score_thoughts and in generate."""
    model = build(objective)
    x = random_text(1, 7, seed=2)
    scores = model.score_thoughts(x, fixed_thoughts(1, 7)[:, 0])
    torch.testing.assert_close(scores.mixed_logits, scores.thought_logits)
    assert (scores.mixing_weight == 1).all()
    out = model.generate(x, max_new_tokens=1, output_logits=True, return_thoughts=True,
                         generator=torch.Generator().manual_seed(0))
    thought_ids = torch.zeros(1, 7, K, dtype=torch.long)
    thought_ids[0, -1] = out.thought_ids[0, 0]
    after = model.score_thoughts(x, thought_ids).thought_logits[:, -1, 0]
    V = out.logits[0].shape[-1]
    torch.testing.assert_close(out.logits[0], after[:, :V], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ the parts by hand
def test_clipped_surrogate_by_hand():
    """Ratio 1.5 against the sampling policy: clipped at 1.2 for a positive advantage (no
    gradient), not for a negative one; padding tokens do not count."""
    logp = torch.tensor([[math.log(1.5), 0.0, 9.0], [math.log(1.5), 0.0, 9.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    loss = clipped_surrogate(logp, old, torch.tensor([2.0, -2.0]), mask, 0.2, 0.2)
    # row 0: -(min(1.5*2, 1.2*2) + min(1*2, 1*2)) / 2 = -(2.4 + 2) / 2
    # row 1: -(min(-3, -2.4) + min(-2, -2)) / 2 = (3 + 2) / 2
    torch.testing.assert_close(loss, torch.tensor([-2.2, 2.5]))
    loss.sum().backward()
    # d/dlogp of -(ratio * A)/2 = -ratio * A / 2 where unclipped; 0 where clipped or padding
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.0, 0.0], [1.5, 1.0, 0.0]]))


def test_prefix_match_by_hand():
    strings = {1: "a", 2: "b", 3: "ab", 4: "abc", 5: "c"}
    texts = lambda ids: [strings[i] for i in ids]  # noqa: E731
    predicted = torch.tensor([1, 3, 3, 4, 3, 2])
    continuation = torch.tensor([[1, 2], [1, 2], [1, 5], [1, 2], [1, 2], [1, 2]])
    valid = torch.tensor([[True, True]] * 4 + [[True, False], [True, True]])
    # 1 = "a" (j = 1); "ab" = "a"+"b" (j = 2); "ab" != "a"+"c"; "abc" ends inside no boundary of
    # "a"+"b" (h = 2); "ab" needs x_{i+2}, which is not valid; "b" != "a"
    assert prefix_match(predicted, continuation, valid, texts).tolist() == [True, True, False, False,
                                                                              False, False]
    assert prefix_match(predicted, continuation, valid, None).tolist() == [True] + [False] * 5


def test_prefix_match_of_ids_without_text():
    """A head wider than the tokenizer samples ids with no token text (None): they match by id only."""
    strings = {1: "a", 2: "b", 3: "ab"}
    texts = lambda ids: [strings.get(i) for i in ids]  # noqa: E731: 9 has no text, as past a tokenizer's end
    predicted = torch.tensor([9, 9, 3, 3])
    continuation = torch.tensor([[9, 1], [1, 2], [9, 2], [1, 2]])
    valid = torch.ones(4, 2, dtype=torch.bool)
    assert prefix_match(predicted, continuation, valid, texts).tolist() == [True, False, False, True]


def test_rpt_reward_matches_a_token_that_spans_two_true_tokens():
    """A tokenizer token whose text is two true tokens' texts together earns the reward."""
    tok = make_tokenizer()
    vocab = tok.get_vocab()
    merged = next(t for t in vocab if len(t) == 2 and t[0] in vocab and t[1] in vocab and t[0] != t[1])
    predicted = torch.tensor([vocab[merged]])
    continuation = torch.tensor([[vocab[merged[0]], vocab[merged[1]]]])
    assert prefix_match(predicted, continuation, torch.ones(1, 2, dtype=torch.bool),
                        tok.convert_ids_to_tokens).tolist() == [True]


def test_thought_health_by_hand():
    """Two thoughts at two positions: at the first both write the next token 7 and are equal; at
    the second one ends after a token, and its 8 (the next token) is after its end: no leak."""
    thoughts = torch.tensor([[[5, 7, 9], [4, 4, 4]],     # g = 0: positions w = 0, 1
                             [[5, 7, 9], [4, 8, 1]]])    # g = 1
    own = torch.ones(2, 2, 3, dtype=torch.bool)
    own[1, 1, 1:] = False
    next_tokens = torch.tensor([[7, 8], [7, 8]])
    health = thought_health(thoughts, own, next_tokens, torch.ones(2, 2, dtype=torch.bool), 2)
    assert {k: round(v.item(), 4) for k, v in health.items()} == {
        "leak_rate": 0.5, "thought_length": 2.5, "distinct_thoughts": 0.75}
    first_only = torch.tensor([[True, False], [True, False]])
    health = thought_health(thoughts, own, next_tokens, first_only, 2)
    assert {k: round(v.item(), 4) for k, v in health.items()} == {
        "leak_rate": 1.0, "thought_length": 3.0, "distinct_thoughts": 0.5}


def test_quietstar_objective_logs_leak_rate_and_distinct_thoughts_as_counted_by_hand():
    """The quietstar objective's training metrics hold the thoughts' health too (the critique
    of its reward: a thought that writes the next token earns it without reasoning)."""
    model = build("quietstar")
    x, mask = text_batch("right")
    with torch.no_grad():  # thoughts drawn mostly from the text's own tokens: leaks and repeats happen
        model.lm.get_output_embeddings().weight[x.unique()] *= 40
    out = model(x, mask, x.masked_fill(mask == 0, -100), generator=torch.Generator().manual_seed(0))
    leaks = distinct = count = 0
    for b in range(x.shape[0]):
        for i in range(int(mask[b].sum()) - 1):  # positions with a real next token
            group = [tuple(t) for t in out.thought_ids[b, :, i].tolist()]
            leaks += sum(x[b, i + 1].item() in t for t in group)
            distinct += len(set(group)) / len(group)
            count += 1
    assert out.metrics["leak_rate"].item() == pytest.approx(leaks / (count * G), abs=1e-6)
    assert out.metrics["distinct_thoughts"].item() == pytest.approx(distinct / count, abs=1e-6)
    assert 0 < leaks < count * G and distinct < count  # the case is not trivial


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("bad,message", [
    ({"objective": "rlp", "thoughts_per_position": 1}, "group size G"),
    ({"objective": "rpt", "thought_temperature": 0.0}, "thought_temperature > 0"),
    ({"thought_count": 2, "thought_fraction": 0.5}, "not both"),
    ({"thought_count": 0}, "thought_count must be None or an int >= 1"),
    ({"clip_eps_low": 1.0}, "clip_eps_low"),
    ({"objective": "grpo"}, "objective"),
])
def test_objective_settings_are_checked(bad, message):
    with pytest.raises(QuietStarInputError, match=message):
        QuietStarConfig(**bad)


def test_which_objectives_keep_an_ema_copy_and_their_policy_temperature():
    assert QuietStarConfig(objective="rlp").uses_ema_copy
    assert not QuietStarConfig(objective="rpt").uses_ema_copy
    assert QuietStarConfig(reward_baseline="ema_base").uses_ema_copy
    assert not QuietStarConfig(objective="rpt", reward_baseline="ema_base").uses_ema_copy
    assert QuietStarConfig().thought_logprob_temperature == 3.0
    assert QuietStarConfig(objective="rlp", thought_temperature=0.7).thought_logprob_temperature == 0.7


def test_thought_count_thinks_at_that_many_positions_per_sequence():
    model = build("rlp", thought_count=2)
    x, mask = text_batch("right")
    out = model(x, mask, generator=torch.Generator().manual_seed(0))
    assert out.thought_positions.sum(1).tolist() == [2, 2]
    assert (out.thought_positions & ~mask.bool()).sum() == 0


@pytest.mark.parametrize("preset,objective", [("rlp", "rlp"), ("rpt", "rpt")])
def test_presets_train_their_objective(tiny_model_dir, tmp_path, preset, objective):
    """``quietstar train --config rlp`` / ``rpt``: the preset's objective, trained for two tiny steps,
    logs the objective's metrics (and RLP checkpoints its EMA copy)."""
    settings = load_config(preset).to_dict()
    assert settings["quietstar"]["objective"] == objective
    settings.update(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"), seq_len=16, batch_size=1,
                    max_steps=2, eval_every=0, sample_every=0, num_documents=20, checkpoint_every=2)
    settings["quietstar"].update(sampled_thought_tokens=3, thoughts_per_position=2)
    result = train(TrainConfig.from_dict(settings))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "policy_loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["mean_reward"]) for r in steps)
    health = ("leak_rate", "thought_length", "distinct_thoughts", "reward_spread")
    assert all(math.isfinite(r[name]) for r in steps for name in health)
    state = torch.load(result.checkpoint / "training_state.pt", weights_only=False)
    assert ("ema" in state) == (objective == "rlp")
