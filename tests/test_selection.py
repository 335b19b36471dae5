"""Thoughts at a chosen share of positions: selection, and exactness against the references."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_model, random_text
from quietstar import QuietStarConfig
from quietstar.method.selection import ThoughtRows, logits_entropy, select_positions
from quietstar.method.targets import training_targets
from test_rollout import (assert_close_finite, assert_same_step, mix_logits, perturb_head,
                          sequential_logits, step_runner, wrap)

K, A = 3, 3


def some_positions(B, L, seed, share=0.4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) < share
    mask[:, 0] = True  # at least one per row; position 0 is a corner case of its own
    return mask


# ---------------------------------------------------------------------------- selection
def test_select_positions_takes_the_top_share_of_candidates():
    candidates = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
                               [0, 0, 1, 1, 1, 1, 0, 0, 0, 0],
                               [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    entropy = torch.tensor([[5., 1, 7, 7, 0, 3, 2, 9, 99, 99],
                            [9., 9, 1, 4, 2, 3, 0, 0, 0, 0],
                            [0., 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    chosen = select_positions(candidates, 0.5, "entropy", entropy)
    # row 0: 4 of 8 (9, 7, 7 then 5; padding's 99 is no candidate); row 1: 2 of 4; row 2: at least 1
    assert chosen.tolist() == [[True, False, True, True, False, False, False, True, False, False],
                               [False, False, False, True, False, True, False, False, False, False],
                               [False] * 9 + [True]]
    # Ties go to the earlier position; a share rounds to the nearest count.
    tie = select_positions(torch.ones(1, 6, dtype=torch.bool), 0.5, "entropy", torch.zeros(1, 6))
    assert tie.tolist() == [[True, True, True, False, False, False]]
    assert select_positions(candidates, 1.0, "entropy", entropy).equal(candidates)


def test_random_selection_is_uniform_and_follows_the_generator():
    candidates = torch.ones(4, 50, dtype=torch.bool)
    candidates[:, 40:] = False
    draws = [select_positions(candidates, 0.25, "random", generator=torch.Generator().manual_seed(s))
             for s in range(200)]
    assert all(d.sum(1).tolist() == [10] * 4 for d in draws)
    assert not any(d[:, 40:].any() for d in draws)
    share = torch.stack(draws).float().mean((0, 1))[:40]  # each candidate ~ 1/4 of the time
    assert share.min() > 0.15 and share.max() < 0.35
    again = select_positions(candidates, 0.25, "random", generator=torch.Generator().manual_seed(3))
    assert again.equal(draws[3]) and not again.equal(draws[4])
    with pytest.raises(ValueError, match="one of"):
        select_positions(candidates, 0.25, "hardest")


def test_thought_rows_gather_scatter_round_trip():
    mask = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    rows = ThoughtRows.from_mask(mask)
    assert rows.index.tolist() == [[1, 3, 4], [0, 0, 0], [0, 0, 0]]
    assert rows.valid.tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    x = torch.arange(15.).view(3, 5)
    assert rows.gather(x).tolist() == [[1., 3, 4], [5, 5, 5], [10, 10, 10]]
    assert rows.scatter(rows.gather(x), 5, -1).tolist() == [[-1., 1, -1, 3, 4], [-1] * 5,
                                                            [10, -1, -1, -1, -1]]
    assert rows.mask(5).equal(mask)
    assert ThoughtRows.from_mask(torch.zeros(2, 4, dtype=torch.bool)).index.shape == (2, 1)


def test_entropy_of_the_chunked_head_equals_softmax_entropy_and_ignores_meta_tokens():
    model = make_model("llama")
    hidden = torch.randn(2, 7, model.lm.config.hidden_size)
    logits = model.logits(hidden)
    assert torch.isinf(logits).any()  # the meta tokens lie inside this LM head
    p = logits.softmax(-1)
    expected = -(p * p.clamp(min=1e-30).log()).sum(-1)
    torch.testing.assert_close(logits_entropy(logits), expected)
    torch.testing.assert_close(model.vocab_head().entropy(hidden), expected)


def test_config_validates_the_fraction_and_selection():
    with pytest.raises(ValueError, match=r"thought_fraction must be in \(0, 1\]"):
        QuietStarConfig(thought_fraction=0.0)
    with pytest.raises(ValueError, match=r"thought_fraction must be in \(0, 1\]"):
        QuietStarConfig(thought_fraction=1.5)
    with pytest.raises(ValueError, match="thought_selection must be one of entropy, random; got 'hard'"):
        QuietStarConfig(thought_selection="hard")
    assert QuietStarConfig(thought_fraction=0.25, thought_selection="random").thought_fraction == 0.25


def test_thought_positions_are_checked():
    model = make_model("llama")
    x = random_text(2, 8)
    thoughts = random_text(16, K).view(2, 8, K)
    for bad in (torch.ones(2, 8), torch.ones(2, 7, dtype=torch.bool), [[True] * 8] * 2):
        with pytest.raises(ValueError, match=r"thought_positions must be a bool tensor \[batch, length\]"):
            model.score_thoughts(x, thoughts, thought_positions=bad)
    with pytest.raises(ValueError, match="pass the earlier output's thought_positions"):
        make_model("llama", thought_fraction=0.5)(x, thought_ids=random_text(2, 16 * K).view(2, 2, 8, K))


# ---------------------------------------------------------------------------- attention
def naive_rows_attention(q, k, v, rows, valid, P, Lq):
    """Per query row: softmax over its text keys 0..i (valid ones; itself if none) and its own
    thought keys of passes 1..p; q [B, H, Qp*S, D] for passes 1..Qp, k/v [B, Hkv, L + P*S, D]."""
    B, H, _, D = q.shape
    Hkv, L = k.shape[1], valid.shape[1]
    out = torch.zeros(B, q.shape[2], H, D, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            for p in range(1, P + 1):
                for r in range(Lq):
                    i = rows[b, r]
                    text = [j for j in range(L) if j <= i and valid[b, j]] or [int(i)]
                    own = [L + (p2 - 1) * Lq + r for p2 in range(1, p + 1)]
                    keys = torch.tensor(text + own)
                    query = q[b, h, (p - 1) * Lq + r]
                    probs = torch.softmax(k[b, kv, keys] @ query * D ** -0.5, 0)
                    out[b, (p - 1) * Lq + r, h] = probs @ v[b, kv, keys]
    return out


def rows_attention_inputs(g, S, *, B, H, Hkv, L, D, P):
    """Random float64 queries q [B, H, P*S, D] of passes 1..P over S rows, keys and values
    k/v [B, Hkv, L + P*S, D] (the text's, then the thought passes'), with gradients, and an
    upstream gradient up [B, P*S, H, D] of the output."""
    q = torch.randn(B, H, P * S, D, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, L + P * S, D, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, L + P * S, D, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(B, P * S, H, D, dtype=torch.float64, generator=g)
    return q, k, v, up


def assert_equals_naive_rows_attention(out, q, k, v, up, rows: ThoughtRows, valid, P):
    """out [B, P*S, H, D] and its gradients of q, k, v (through up) equal naive_rows_attention's
    at the real rows; padding rows' outputs are never read."""
    S = rows.index.shape[1]
    real = rows.valid.repeat(1, P)[:, :, None, None]
    reference = naive_rows_attention(q, k, v, rows.index, valid, P, S)
    ours = [out * real, *torch.autograd.grad((out * up * real).sum(), (q, k, v))]
    theirs = [reference * real, *torch.autograd.grad((reference * up * real).sum(), (q, k, v))]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("path", ["fused", "general", "sdpa"])
def test_rows_attention_equals_naive_with_gradients(padded, path):
    """Selected rows' queries see their own text prefix and own thought, on every kernel path
    (sdpa is the GPU's; its numerics are device-independent)."""
    from quietstar.method import attention

    fn = {"fused": attention._fused_thought_attention, "general": attention._general_thought_attention,
          "sdpa": attention._sdpa_thought_attention}[path]
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, D, P = 2, 4, 2, 7, 8, 3
    valid = torch.ones(B, L, dtype=torch.bool)
    if padded:
        valid[1, :3] = False
    mask = torch.tensor([[1, 0, 0, 1, 0, 1, 1], [0, 0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    rows = ThoughtRows.from_mask(mask)
    S = rows.index.shape[1]
    q, k, v, up = rows_attention_inputs(g, S, B=B, H=H, Hkv=Hkv, L=L, D=D, P=P)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    layout = attention.ThoughtLayout(L, tuple(range(1, P + 1)), valid, positions, padded, rows=rows.index)
    keys = attention.PassKeys()
    keys.add(k[:, :, :L].split(L, 2), v[:, :, :L].split(L, 2))
    keys.add(k[:, :, L:].split(S, 2), v[:, :, L:].split(S, 2))
    out = fn(q, keys, layout, D ** -0.5)[0]
    assert_equals_naive_rows_attention(out, q, k, v, up, rows, valid, P)


# ---------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_selected_scoring_equals_sequential_and_all_positions(family, padding):
    model, reference = wrap(family)
    perturb_head(model)
    B, L = 2, 11
    x = random_text(B, L, seed=3)
    mask = torch.ones_like(x)
    if padding == "right":
        mask[1, L - 4:] = 0
    elif padding == "left":
        mask[1, :4] = 0
    thoughts = random_text(B * L, K, seed=4).view(B, L, K)
    chosen = some_positions(B, L, seed=5) & mask.bool()
    everywhere = model.score_thoughts(x, thoughts, mask)
    scores = model.score_thoughts(x, thoughts, mask, thought_positions=chosen)
    assert scores.thought_positions.equal(chosen)
    torch.testing.assert_close(scores.base_logits, everywhere.base_logits, atol=1e-5, rtol=0)
    idx = (torch.arange(L)[:, None] + torch.arange(A)[None, :]).clamp(max=L - 1)
    for b in range(B):
        keep = mask[b].bool()
        text, columns = x[b][keep], keep.nonzero().flatten()
        with torch.no_grad():
            plain = reference(inputs_embeds=model.get_input_embeddings()(text[None])).logits[0]
        for i, col in enumerate(columns.tolist()):
            if not chosen[b, col]:  # predicts with the base
                assert (scores.mixing_weight[b, col] == 0).all()
                for name in ("thought_logits", "mixed_logits"):
                    assert torch.equal(getattr(scores, name)[b, col], scores.base_logits[b, idx[col]])
                continue
            for name in ("thought_logits", "mixed_logits", "mixing_weight"):
                torch.testing.assert_close(getattr(scores, name)[b, col], getattr(everywhere, name)[b, col],
                                           atol=1e-5, rtol=0)
            logits = sequential_logits(model, reference, text, i, thoughts[b, col])
            end = i + 1 + K + 1
            for s in range(min(A, len(text) - i)):
                assert_close_finite(scores.thought_logits[b, col, s], logits[end + s], model)
                expected = mix_logits(model, plain[i + s], logits[end + s], scores.mixing_weight[b, col, s])
                assert_close_finite(scores.mixed_logits[b, col, s], expected, model)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_selected_greedy_thoughts_equal_all_position_ones(family):
    model, _ = wrap(family)
    x = random_text(2, 10, seed=5)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    chosen = some_positions(2, 10, seed=6) & mask.bool()
    everywhere = model.sample_thoughts(x, mask, temperature=0.0)
    some = model.sample_thoughts(x, mask, temperature=0.0, thought_positions=chosen)
    assert torch.equal(some[chosen], everywhere[chosen])
    assert (some[~chosen] == model.tokenizer.pad_token_id).all()


# ---------------------------------------------------------------------------- training
def count_decoder_rows(model, monkeypatch):
    calls = []
    decoder_forward = model.decoder.forward

    def counting(*args, **kwargs):
        calls.append((kwargs["inputs_embeds"].shape[1], torch.is_grad_enabled()))
        return decoder_forward(*args, **kwargs)

    monkeypatch.setattr(model.decoder, "forward", counting)
    return calls


def test_training_step_runs_later_passes_over_the_chosen_rows_only(monkeypatch):
    """The text pass over all L tokens, then START, the k - 1 sampled tokens and the last A + 1
    passes over S rows: L + (F - 1) S query rows in all, in k + 2 calls."""
    k, L = 4, 20
    model = make_model("llama", sampled_thought_tokens=k, ahead_tokens=A, thought_fraction=0.25)
    F = model.config.passes_per_step
    calls = count_decoder_rows(model, monkeypatch)
    out = model(random_text(2, L, seed=1), generator=torch.Generator().manual_seed(0))
    S = round(0.25 * (L - 1))
    assert out.thought_positions.sum(1).tolist() == [S, S]
    assert [rows for rows, _ in calls] == [L, S] + [S] * (k - 1) + [(A + 1) * S]
    assert sum(rows for rows, _ in calls) == L + (F - 1) * S


def test_entropy_selection_thinks_where_the_base_is_least_sure():
    model = make_model("llama", thought_fraction=0.3, policy_loss_weight=0.0)
    x = random_text(2, 16, seed=2)
    mask = torch.ones_like(x)
    mask[1, 11:] = 0
    out = model(x, mask, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.base_logits(x, mask)
    p = logits.softmax(-1)
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)
    for b, candidates in enumerate((15, 10)):  # positions with a next token
        expected = entropy[b, :candidates].topk(round(0.3 * candidates)).indices.sort().values
        assert out.thought_positions[b].nonzero().flatten().tolist() == expected.tolist()
    assert (out.thought_ids[:, :, ~out.thought_positions[0]][0] == model.tokenizer.pad_token_id).all()


def test_random_selection_follows_the_generator_and_shares_positions_across_thoughts():
    model = make_model("llama", thought_fraction=0.4, thought_selection="random")
    x = random_text(3, 12, seed=2)
    a = model(x, generator=torch.Generator().manual_seed(0)).thought_positions
    b = model(x, generator=torch.Generator().manual_seed(0)).thought_positions
    c = model(x, generator=torch.Generator().manual_seed(1)).thought_positions
    assert a.equal(b) and not a.equal(c)
    assert a.sum(1).tolist() == [round(0.4 * 11)] * 3


def test_selected_training_loss_equals_its_reference():
    """With chosen positions: the base NLL over every position, the mixed NLL and REINFORCE over
    the chosen ones only, each from the all-position scoring of the same thoughts."""
    n, L = 2, 10
    model = make_model("llama", thoughts_per_position=n, policy_loss_weight=3.0, drop_negative_rewards=False,
                       thought_temperature=2.0)
    model.double()
    perturb_head(model)
    x = random_text(2, L, seed=8)
    mask = torch.ones_like(x)
    mask[1, 7:] = 0
    chosen = some_positions(2, L, seed=9)
    out = model(x, mask, generator=torch.Generator().manual_seed(0), thought_positions=chosen)
    has_target = torch.zeros(2, L, dtype=torch.bool)
    has_target[0, :L - 1], has_target[1, :6] = True, True
    assert out.thought_positions.equal(chosen & has_target)
    thinking = out.thought_positions.repeat_interleave(n, 0)
    # The reference: every position's numbers for the same thoughts (pad tokens where none).
    xs, ms = x.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    thoughts = out.thought_ids.flatten(0, 1)
    scores = model.score_thoughts(xs, thoughts, ms)
    targets, valid = training_targets(xs, ms, None, model.config.ahead_tokens)
    logp = lambda logits, t, T=1.0: torch.log_softmax(logits / T, -1).gather(-1, t[..., None])[..., 0]  # noqa: E731
    base = logp(scores.base_logits, targets[..., 0])
    mixed = logp(scores.mixed_logits, targets)
    grid = model.rollout.score(xs, thoughts, ms)
    thought_logp = logp(model.logits(grid.thought), thoughts, 3.0).mean(-1)
    counted = valid & thinking[..., None]
    base_nll = -base[valid[..., 0]].mean()
    mixed_nll = [-mixed[..., s][counted[..., s]].mean() for s in range(A)]
    ll = (mixed * counted).sum(-1).view(2, n, L)
    reward = (ll - ll.mean(1, keepdim=True)).view(2 * n, L)
    policy = (-reward * thought_logp)[counted[..., 0]].mean()
    for name, value in (("base_nll", base_nll), ("policy_loss", policy),
                        *((f"mixed_nll_{s + 1}", mixed_nll[s]) for s in range(A))):
        torch.testing.assert_close(out.metrics[name], value, atol=1e-10, rtol=1e-9, msg=name)
    torch.testing.assert_close(out.loss, 0.5 * base_nll + 0.5 * torch.stack(mixed_nll).mean() + 3.0 * policy,
                               atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])
def test_selected_single_pass_training_equals_grid_scoring_and_all_positions(family):
    """The chosen rows' rollout, sampled and scored in the same passes, equals sampling first and
    scoring the grid in one forward (activation checkpointing) and replaying the thoughts, with
    every gradient; choosing every candidate equals the all-position step."""
    model, x, mask, run = step_runner(family, thought_fraction=0.4)
    online, online_grads = run(generator=torch.Generator().manual_seed(3))
    assert 0 < online.thought_positions.sum() < mask[:, 1:].sum()
    replayed = run(thought_ids=online.thought_ids, thought_positions=online.thought_positions)
    model.activation_checkpointing_enable()
    model.train()
    checkpointed = run(generator=torch.Generator().manual_seed(3))
    for other, other_grads in (replayed, checkpointed):
        assert torch.equal(other.thought_ids, online.thought_ids)
        assert torch.equal(other.thought_positions, online.thought_positions)
        assert_same_step(online, other, online_grads, other_grads)
    model.lm.activation_checkpointing_disable()
    # every candidate chosen == the all-position path, given the same thoughts
    model.config.thought_fraction = 1.0
    everywhere = run(thought_ids=online.thought_ids)
    all_chosen = run(thought_ids=online.thought_ids, thought_positions=torch.ones_like(mask, dtype=torch.bool))
    assert_same_step(everywhere[0], all_chosen[0], everywhere[1], all_chosen[1])


@pytest.mark.parametrize("padded", [False, True])
def test_rows_attention_in_blocks_of_keys_equals_general_with_gradients(padded):
    """Many selected rows: the CPU kernel runs blocks of rows over only the keys they need
    (``ThoughtLayout.row_chunks``); values and gradients equal the plain tensor-op path."""
    from quietstar.method import attention

    g = torch.Generator().manual_seed(1)
    B, H, Hkv, L, D, P = 2, 4, 2, 90, 8, 2
    valid = torch.ones(B, L, dtype=torch.bool)
    if padded:
        valid[1, :7] = False
    rows = ThoughtRows.from_mask(torch.rand(B, L, generator=g) < 0.8)
    S = rows.index.shape[1]
    layout = attention.ThoughtLayout(L, (1, 2), valid, (valid.long().cumsum(-1) - 1).clamp(min=0), padded,
                                     rows=rows.index)
    assert len(layout.row_chunks()) >= 2
    q, k, v, up = rows_attention_inputs(g, S, B=B, H=H, Hkv=Hkv, L=L, D=D, P=P)
    results = []
    for fn in (attention._fused_thought_attention, attention._general_thought_attention):
        keys = attention.PassKeys()
        keys.add(k[:, :, :L].split(L, 2), v[:, :, :L].split(L, 2))
        keys.add(k[:, :, L:].split(S, 2), v[:, :, L:].split(S, 2))
        out = fn(q, keys, layout, D ** -0.5)[0]
        results.append([out, *torch.autograd.grad((out * up).sum(), (q, k, v))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("chosen", [False, True], ids=["every-position", "chosen-positions"])
def test_think_equals_sample_then_score(chosen):
    """One rollout (text pass once) gives the thoughts and scores of sample_thoughts followed by
    score_thoughts with the same generator; ``steps`` keeps the first ahead predictions."""
    model, _ = wrap("llama", thought_temperature=1.5)
    perturb_head(model)
    x = random_text(2, 10, seed=5)
    mask = torch.ones_like(x)
    mask[1, 7:] = 0
    positions = some_positions(2, 10, seed=7) if chosen else None
    thoughts, scores = model.think(x, mask, generator=torch.Generator().manual_seed(4),
                                   thought_positions=positions)
    sampled = model.sample_thoughts(x, mask, generator=torch.Generator().manual_seed(4),
                                    thought_positions=positions)
    assert torch.equal(thoughts, sampled)
    reference = model.score_thoughts(x, sampled, mask, positions)
    first = model.score_thoughts(x, sampled, mask, positions, steps=1)
    real = mask.bool()
    for name in ("base_logits", "thought_logits", "mixed_logits", "mixing_weight"):
        ours, theirs = getattr(scores, name)[real], getattr(reference, name)[real]
        finite = torch.isfinite(theirs)
        assert torch.equal(finite, torch.isfinite(ours))
        torch.testing.assert_close(ours[finite], theirs[finite], atol=1e-5, rtol=0)
        if name != "base_logits":
            assert torch.equal(getattr(first, name), getattr(reference, name)[:, :, :1])
    with pytest.raises(ValueError, match=r"steps must be an int in 1..ahead_tokens = 1..3"):
        model.score_thoughts(x, sampled, mask, steps=4)
    with pytest.raises(ValueError, match="think needs a thought of num_tokens >= 1"):
        model.think(x, num_tokens=0)


# ---------------------------------------------------------------------------- inference at a fraction
def test_next_token_candidates_are_real_positions_with_a_real_successor():
    from quietstar.method.selection import next_token_candidates

    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert next_token_candidates(mask).tolist() == [[True, True, False, False, False],
                                                    [False, False, True, True, False],
                                                    [True, True, True, True, False]]
    # what training counts as a valid next-token target when no label is ignored
    assert next_token_candidates(mask).equal(training_targets(torch.zeros_like(mask), mask, None, 1)[1][..., 0])


def test_think_at_a_fraction_chooses_in_its_own_rollout(monkeypatch):
    """``thought_fraction`` chooses as training does (the top entropy share of the positions with
    a next token), on the rollout's own text pass: no other text pass runs. Sampling alone and
    ``choose_thought_positions`` choose the same; fixed positions then give the same thoughts
    and scores. The default (None) is every position, whatever the config's fraction, and given
    ``thought_positions`` win over a fraction."""
    k, L = 2, 12
    model, _ = wrap("llama", thought_temperature=1.5, thought_fraction=0.5)
    perturb_head(model)
    x = random_text(2, L, seed=5)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding: 8 positions with a next token, against 11
    with torch.no_grad():
        entropy = logits_entropy(model.base_logits(x, mask))
    candidates = torch.zeros(2, L, dtype=torch.bool)
    candidates[0, :L - 1], candidates[1, 3:L - 1] = True, True
    expected = select_positions(candidates, 0.5, "entropy", entropy)
    assert expected.sum(1).tolist() == [6, 4]

    calls = count_decoder_rows(model, monkeypatch)
    thoughts, scores = model.think(x, mask, k, generator=torch.Generator().manual_seed(4), thought_fraction=0.5)
    assert scores.thought_positions.equal(expected)
    S = 6
    assert [rows for rows, _ in calls] == [L, S] + [S] * (k - 1) + [(A + 1) * S]  # one text pass, then S rows
    assert (thoughts[~expected] == model.tokenizer.pad_token_id).all()
    chosen = model.choose_thought_positions(x, mask, 0.5)
    assert chosen.equal(expected)
    sampled = model.sample_thoughts(x, mask, k, generator=torch.Generator().manual_seed(4), thought_fraction=0.5)
    assert torch.equal(sampled, thoughts)
    fixed_thoughts, fixed = model.think(x, mask, k, generator=torch.Generator().manual_seed(4),
                                        thought_positions=expected)
    assert torch.equal(fixed_thoughts, thoughts)
    for name in ("base_logits", "thought_logits", "mixed_logits", "mixing_weight", "thought_positions"):
        assert torch.equal(getattr(fixed, name), getattr(scores, name)), name

    assert model.think(x, mask, k, generator=torch.Generator().manual_seed(4))[1].thought_positions is None
    given = some_positions(2, L, seed=3)
    _, won = model.think(x, mask, k, thought_positions=given, thought_fraction=0.5)
    assert won.thought_positions.equal(given & mask.bool())
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"thought_fraction must be in \(0, 1\]"):
            model.sample_thoughts(x, mask, k, thought_fraction=bad)


def test_random_choice_at_inference_follows_the_generator():
    """``thought_selection="random"`` overrides the config's entropy: the same draws as
    ``choose_thought_positions`` with the same seed, before any thought token is sampled."""
    model, _ = wrap("llama", thought_temperature=0.0)
    x = random_text(3, 12, seed=2)

    def think(seed):
        return model.think(x, num_tokens=2, generator=torch.Generator().manual_seed(seed), thought_fraction=0.4,
                           thought_selection="random")[1].thought_positions

    a, b, c = think(0), think(0), think(1)
    assert a.equal(b) and not a.equal(c)
    assert a.sum(1).tolist() == [round(0.4 * 11)] * 3 and not a[:, -1].any()
    chosen = model.choose_thought_positions(x, thought_fraction=0.4, thought_selection="random",
                                            generator=torch.Generator().manual_seed(0))
    assert chosen.equal(a)
    assert model.choose_thought_positions(x).equal(torch.ones_like(x, dtype=torch.bool))  # fraction 1: every one
