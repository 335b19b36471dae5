"""Long thoughts at a few positions: early ending at END / EOS when sampling, a thought prefix,
and the cost of the thought part (k + 1 decoder calls, keys for the S chosen rows only).

The exact equality of early-ended and prefixed thoughts with a sequential reference is in
tests/test_objectives.py; here the sampling path is checked against replaying its thoughts.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_lm, make_tokenizer, random_text
from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.method import rollout as rollout_module
from quietstar.utils.errors import QuietStarInputError

H, G = 2, 3


def build(k: int, **kw) -> QuietStarForCausalLM:
    config = QuietStarConfig(**{"objective": "rlp", "sampled_thought_tokens": k, "ahead_tokens": H,
                                "thoughts_per_position": G, "thought_temperature": 1.0, **kw})
    return QuietStarForCausalLM.from_base(make_lm("llama"), make_tokenizer(), config)


def eager_eos(model) -> None:
    """EOS becomes likely after about half of the hidden states (its logit row made large), so
    sampled thoughts end early often, but not always."""
    with torch.no_grad():
        model.lm.get_output_embeddings().weight[model.tokenizer.eos_token_id] *= 40


def test_sampled_thoughts_end_at_a_stop_and_replay_exactly():
    """With thought_can_end the sampling passes feed END right after a stop and padding after
    it; replaying the same thoughts through the one-forward scoring gives the same gradients
    and metrics, so both paths lay each row out alike."""
    model = build(8, thought_can_end=True, thought_count=3, thought_selection="random")
    eager_eos(model)
    x = random_text(2, 12, seed=4)
    out = model(x, generator=torch.Generator().manual_seed(0))
    rows = out.thought_positions[:, None].expand(-1, G, -1)            # [B, G, L]
    thoughts = out.thought_ids[rows]                                      # [rows, k]
    stops = (thoughts == model.tokenizer.eos_token_id) | (thoughts == model.end_id)
    first = torch.where(stops.any(1), stops.float().argmax(1), 8)
    assert (first < 8).any() and (first == 8).any(), "the test needs ended and unended thoughts"
    after_stop = torch.arange(8)[None, :] > first[:, None]
    assert (thoughts[after_stop] == model.tokenizer.pad_token_id).all()

    params = [p for p in model.parameters() if p.requires_grad]
    sampled = torch.autograd.grad(out.loss, params, allow_unused=True)
    replay = model(x, thought_ids=out.thought_ids, thought_positions=out.thought_positions)
    replayed = torch.autograd.grad(replay.loss, params, allow_unused=True)
    for a, b in zip(sampled, replayed):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for name in ("mean_reward", "thought_nll", "thought_gain", "reward_spread"):
        torch.testing.assert_close(out.metrics[name], replay.metrics[name], atol=1e-6, rtol=1e-6)


def test_score_thoughts_takes_end_where_it_ends_a_thought():
    """A sampled thought may end at END (thought_can_end, END in the head): ``score_thoughts``
    takes such thoughts (held-out evaluation scores them) and reads END as their end, as it
    reads EOS; without thought_can_end END in a given thought is refused as before."""
    model = build(3, thought_can_end=True)
    x = random_text(1, 6, seed=2)
    with_end, with_eos = torch.full((1, 6, 3), 5), torch.full((1, 6, 3), 5)
    with_end[..., 1], with_eos[..., 1] = model.end_id, model.tokenizer.eos_token_id
    with torch.no_grad():
        a = model.score_thoughts(x, with_end, steps=1).mixed_logits
        b = model.score_thoughts(x, with_eos, steps=1).mixed_logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(QuietStarInputError, match="contain START/END"):
        build(3).score_thoughts(x, with_end)
    with pytest.raises(QuietStarInputError, match="contain START/END"):
        model.score_thoughts(x, with_end.masked_fill(with_end == model.end_id, model.start_id))


def test_without_thought_can_end_a_sampled_eos_is_an_ordinary_thought_token():
    model = build(8, thought_count=3, thought_selection="random")
    eager_eos(model)
    out = model(random_text(2, 12, seed=4), generator=torch.Generator().manual_seed(0))
    rows = out.thought_positions[:, None].expand(-1, G, -1)
    thoughts = out.thought_ids[rows]
    eos = thoughts == model.tokenizer.eos_token_id
    assert eos.any() and (eos.float().argmax(1) < 7).any()
    # nothing is padded after it: the tokens that follow an EOS are sampled ones
    following = torch.roll(eos, 1, dims=1) & ~eos
    following[:, 0] = False
    assert (thoughts[following] != model.tokenizer.pad_token_id).any()


class _Recorder(rollout_module._Passes):
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Recorder.made.append(self)


@pytest.mark.parametrize("k", [4, 16])
@pytest.mark.parametrize("prefix", ["", "Q:"])
def test_the_thought_part_costs_k_plus_one_calls_and_keys_for_the_chosen_rows_only(monkeypatch, k, prefix):
    """A training step on L tokens with S chosen positions per sequence: the text pass, then
    START (and the prefix) in one call, one call per later thought token, one for the last
    token, END and the teacher-forced tokens: k + 2 decoder calls (k + 1 when every position
    thinks: the text shares START's call). Every layer keeps the text's L keys once and, per
    thought pass, S keys per sequence (not L): memory O(L + S (m + k + A)) keys per layer."""
    monkeypatch.setattr(rollout_module, "_Passes", _Recorder)
    _Recorder.made = []
    model = build(k, thought_count=2, thought_prefix=prefix)
    m = len(model.thought_prefix_ids)
    model.ema_baseline_enable()  # before the hook: the EMA copy's own text pass is not counted
    calls = []
    model.decoder.register_forward_hook(lambda *args: calls.append(1))
    B, L = 2, 40
    model(random_text(B, L, seed=1), generator=torch.Generator().manual_seed(0))
    assert len(calls) == k + 2
    (run,) = _Recorder.made
    stores = list(run.key_store.values())
    assert len(stores) == model.lm.config.num_hidden_layers
    for store in stores:
        assert store.text_key.shape[0] == B * G and store.text_key.shape[2] == L
        assert len(store.own_keys) == 1 + m + k + H  # START, prefix, t_1..t_k, END, A - 1 forced
        assert all(block.shape[2] == 2 for block in store.own_keys)  # S = 2 rows, not L

    calls.clear()
    every = build(k, thought_prefix=prefix)
    every.ema_baseline_enable()
    every.decoder.register_forward_hook(lambda *args: calls.append(1))
    every(random_text(B, 10, seed=1), generator=torch.Generator().manual_seed(0))
    assert len(calls) == k + 1


def test_a_thought_prefix_is_forced_in_generation_too():
    """generate feeds START and the prefix in one cached call: its output equals the thought
    scored with the prefix in the rollout (score_thoughts), for the first generated token."""
    model = build(3, objective="quietstar", thought_prefix="Q:", thoughts_per_position=2)
    with torch.no_grad():
        last = model.mixing_head.mlp[-1]
        last.bias.fill_(0.5)  # the mixed prediction reads the thought
    x = random_text(1, 7, seed=2)
    out = model.generate(x, max_new_tokens=1, return_thoughts=True, output_logits=True,
                         generator=torch.Generator().manual_seed(0))
    thought_ids = torch.zeros(1, 7, 3, dtype=torch.long)
    thought_ids[0, -1] = out.thought_ids[0, 0]                            # the first token's thought
    scores = model.score_thoughts(x, thought_ids)
    V = out.logits[0].shape[-1]
    torch.testing.assert_close(out.logits[0], scores.mixed_logits[:, -1, 0, :V], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad,message", [
    ({"objective": "quietstar", "thought_can_end": True}, "thought_can_end needs objective"),
    ({"thought_prefix": "<|endofthought|>"}, "must not contain the thought meta tokens"),
])
def test_long_thought_settings_are_checked(bad, message):
    with pytest.raises(QuietStarInputError, match=message):
        QuietStarConfig(**{"objective": "rlp", **bad})


# ------------------------------------------------------------------ generation ends thoughts as training does
def _left_padded(lengths, pad_id):
    L = max(lengths)
    ids, mask = torch.full((len(lengths), L), pad_id), torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, L - n:], mask[b, L - n:] = random_text(1, n, seed=20 + b)[0], 1
    return ids, mask


def _stop_lengths(model, thoughts):
    """c per thought: the ids before its first stop (k if none), by the rollout's rule."""
    return model.rollout.fed_tokens(thoughts)


@pytest.mark.parametrize("threshold", [0.0, 5.38])
def test_generation_ends_a_thought_where_scoring_does(threshold):
    """With thought_can_end, generation ends each row's thought at its first END / EOS, as the
    training and scoring rollout does: every generated token's logits equal those of
    ``score_thoughts`` on the same text and thought, with the text left-padded as generated and
    right-padded as training pads, in a batch whose rows end their thoughts at different steps
    (a threshold: rows that do not think take the base prediction)."""
    k = 4
    model = build(k, thought_can_end=True, thought_prefix="Q:")
    with torch.no_grad():  # a sharper head (entropies spread about the threshold), END and EOS
        head = model.lm.get_output_embeddings().weight  # likely: thoughts end early often, not always
        head *= 8
        head[[model.tokenizer.eos_token_id, model.end_id]] *= 30 / 8
    pad_id = model.tokenizer.pad_token_id
    lengths, N = [5, 8, 3], 4
    ids, mask = _left_padded(lengths, pad_id)
    out = model.generate(ids, mask, max_new_tokens=N, eos_token_id=[], thought_temperature=1.0,
                         thought_threshold=threshold, return_thoughts=True, output_logits=True,
                         generator=torch.Generator().manual_seed(3))
    taken = out.thought_taken                                              # [B, N]
    c = _stop_lengths(model, out.thought_ids)                              # [B, N]
    assert (c[taken] < k).any() and (c[taken] == k).any(), "the test needs ended and unended thoughts"
    assert any(len(set(c[:, s][taken[:, s]].tolist())) > 1 for s in range(N)), "rows must end apart"
    assert 0 < taken.sum() < taken.numel() if threshold else taken.all()

    L = ids.shape[1]
    V = out.logits[0].shape[-1]
    for s in range(N):
        text = out.sequences[:, :L + s]
        text_mask = torch.cat([mask, torch.ones(3, s, dtype=torch.long)], 1)
        n = text_mask.sum(1)
        right = torch.full_like(text, pad_id)
        for b in range(3):  # the same texts, right-padded
            right[b, :n[b]] = text[b, text_mask[b].bool()]
        right_mask = (torch.arange(L + s) < n[:, None]).long()
        for x, x_mask, last in ((text, text_mask, torch.full((3,), L + s - 1)), (right, right_mask, n - 1)):
            thoughts = torch.full((3, L + s, k), 7)
            thoughts[torch.arange(3), last] = out.thought_ids[:, s]
            with torch.no_grad():
                scores = model.score_thoughts(x, thoughts, x_mask, steps=1)
            expected = scores.mixed_logits[torch.arange(3), last, 0, :V]
            expected = torch.where(taken[:, s, None], expected, scores.base_logits[torch.arange(3), last, :V])
            torch.testing.assert_close(out.logits[s], expected, atol=2e-5, rtol=0)

    # as training's thought ids: the stop kept, the pad id after it; the text decoded without it
    after = torch.arange(k) > c[..., None]
    assert (out.thought_ids[after & taken[..., None]] == pad_id).all()
    for b in range(3):
        for s in range(N):
            if taken[b, s]:
                assert out.thoughts[b][s] == model.tokenizer.decode(out.thought_ids[b, s, :c[b, s]].tolist())


def test_generation_stops_calling_the_decoder_once_every_thought_has_ended():
    """Thoughts that all end at their first token cost one call after START's: END's."""
    k = 6
    model = build(k, thought_can_end=True)
    with torch.no_grad():
        model.lm.get_output_embeddings().weight[model.tokenizer.eos_token_id] *= 1000
    calls = []
    model.decoder.register_forward_hook(lambda *args: calls.append(1))
    out = model.generate(random_text(2, 5, seed=1), max_new_tokens=3, eos_token_id=[], thought_temperature=1.0,
                         return_thoughts=True, generator=torch.Generator().manual_seed(0))
    assert (out.thought_ids[..., 0] == model.tokenizer.eos_token_id).all()
    assert out.thoughts == [["", "", ""], ["", "", ""]]
    assert len(calls) == 3 * 2  # per token: [x, START], then [END]


def test_without_thought_can_end_generation_thinks_k_tokens_through_a_sampled_eos():
    """thought_can_end=False (quietstar's only choice): an EOS in a thought is an ordinary token,
    the thought runs its k tokens, and END stays unsampleable, as before."""
    k = 6
    model = build(k)
    eager_eos(model)
    out = model.generate(random_text(2, 5, seed=1), max_new_tokens=3, eos_token_id=[], thought_temperature=1.0,
                         return_thoughts=True, generator=torch.Generator().manual_seed(0))
    eos = out.thought_ids == model.tokenizer.eos_token_id
    assert eos[..., :-1].any() and not (out.thought_ids == model.end_id).any()
    following = torch.roll(eos, 1, dims=-1) & ~eos
    following[..., 0] = False
    assert (out.thought_ids[following] != model.tokenizer.pad_token_id).all()
