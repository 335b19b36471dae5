"""rlp / rpt with ``thought_tokens_per_backward`` (sampling without gradients, the text pass once per
text, the thoughts scored and differentiated a group of positions at a time) give the loss,
metrics and gradients of the one-graph step: given thoughts with padding on either side and
early-ended thoughts, sampled thoughts (the same draws), every position or a few; and
``HeldGradients`` equals one backward, loss scaling included."""

from __future__ import annotations

import pytest
import torch

from conftest import make_lm, make_tokenizer, random_text
from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.method.held_gradients import HeldGradients
from quietstar.utils.errors import QuietStarInputError
from test_objectives import rpt_text_that_rewards

K, H, G = 3, 2, 3
ATOL = 1e-5


def build(objective: str, **kw) -> QuietStarForCausalLM:
    config = QuietStarConfig(objective=objective, sampled_thought_tokens=K, ahead_tokens=H, thoughts_per_position=G,
                             thought_temperature=0.7, **kw)
    model = QuietStarForCausalLM.from_base(make_lm("llama"), make_tokenizer(), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if config.uses_ema_copy:  # an EMA copy apart from the LM, so the rewards are not trivial
            model.ema_baseline_enable()
            for p in model.ema_lm.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def text_batch(padding: str, L: int = 10):
    x = random_text(2, L, seed=3)
    mask = torch.ones_like(x)
    if padding == "left":
        mask[1, :2] = 0
    elif padding == "right":
        mask[1, -2:] = 0
    return x.masked_fill(mask == 0, 0), mask


def step(model, tokens: int, *args, seed: int | None = None, **kwargs):
    """(output, every trainable parameter's gradient) of one forward and backward; ``seed``: the
    thoughts sampled from a generator of that seed."""
    model.zero_grad(set_to_none=True)
    if seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    out = model(*args, thought_tokens_per_backward=tokens, **kwargs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_step(model, *args, **kwargs):
    """Groups of one position, of two, and all in one group equal the one-graph step."""
    one, want = step(model, 0, *args, **kwargs)
    assert any(g.abs().max() > 1e-4 for g in want.values()), "no gradient: the test would prove nothing"
    per_position = G * (len(model.thought_prefix_ids) + K + H + 1) * args[0].shape[0]
    for tokens in (1, 2 * per_position, 10 ** 6):
        out, got = step(model, tokens, *args, **kwargs)
        assert abs(out.loss.item() - one.loss.item()) < ATOL
        assert out.terms["policy"].requires_grad
        for name, value in one.metrics.items():
            torch.testing.assert_close(out.metrics[name], value, atol=ATOL, rtol=0, msg=name)
        assert torch.equal(out.thought_ids, one.thought_ids)
        assert (out.thought_positions is None) == (one.thought_positions is None)
        assert got.keys() == want.keys()
        for name, g in want.items():
            scale = model.config.meta_token_lr_multiplier if "scaled_vectors" in name else 1.0
            torch.testing.assert_close(got[name], g, atol=ATOL * scale, rtol=0, msg=name)
    return one


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    positions = torch.zeros_like(mask, dtype=torch.bool)
    for b in range(mask.shape[0]):
        real = mask[b].nonzero().flatten().tolist()
        for j in (0, 3, 5, len(real) - 2):
            positions[b, real[j]] = True
    return positions


@pytest.mark.parametrize("objective,extra", [("rlp", {}), ("rlp", {"next_token_loss_weight": 0.3}), ("rpt", {})])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_given_thoughts_at_chosen_positions_equal_one_backward(objective, extra, padding):
    model = build(objective, **extra)
    x, mask = text_batch(padding)
    thoughts = torch.randint(2, 300, (2, G, x.shape[1], K), generator=torch.Generator().manual_seed(5))
    if objective == "rpt":  # next tokens that the first thought of each group predicts: rewards of 1
        x = rpt_text_that_rewards(model, x, mask, thoughts, positions_of(mask))
    one = assert_same_step(model, x, mask, thought_ids=thoughts, thought_positions=positions_of(mask))
    assert one.thought_positions is not None


@pytest.mark.parametrize("objective", ["rlp", "rpt"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_early_ended_thoughts_and_a_prefix_equal_one_backward(objective, padding):
    model = build(objective, thought_can_end=True, thought_prefix="Q:")
    x, mask = text_batch(padding)
    thoughts = torch.randint(2, 300, (2, G, x.shape[1], K), generator=torch.Generator().manual_seed(5))
    eos = model.tokenizer.eos_token_id
    thoughts[:, 0, ::3, 0] = model.end_id   # empty thoughts
    thoughts[:, 1, 1::3, 1] = eos           # ended at their second token
    thoughts[:, 2, ::2, K - 1] = eos        # at their last
    if objective == "rpt":
        x = rpt_text_that_rewards(model, x, mask, thoughts, positions_of(mask))
    assert_same_step(model, x, mask, thought_ids=thoughts, thought_positions=positions_of(mask))


@pytest.mark.parametrize("objective,extra", [("rlp", {"thought_count": 3, "thought_selection": "random"}),
                                             ("rlp", {"thought_fraction": 0.5}),  # chosen by entropy
                                             ("rlp", {"thought_can_end": True}),  # every position thinks
                                             ])
def test_sampled_thoughts_equal_one_backward(objective, extra):
    """The thoughts are sampled without gradients, with the same draws as the one-graph step."""
    model = build(objective, **extra)
    x, mask = text_batch("left")
    one = assert_same_step(model, x, mask, seed=4)
    assert (one.thought_positions is None) == (not extra.get("thought_count") and "thought_fraction" not in extra)


def test_text_pass_runs_once_per_text_and_each_group_alone(monkeypatch):
    """The text pass runs once, on the B texts (not on their B*G thought rows); sampling reads its
    keys without gradients; then one scoring call per group."""
    model = build("rlp", thought_count=4)
    model.ema_baseline_enable()
    sizes = []
    model.decoder.register_forward_hook(lambda module, args, kwargs, out: sizes.append(
        (torch.is_grad_enabled(), tuple(kwargs["inputs_embeds"].shape[:2]))), with_kwargs=True)
    x = random_text(2, 12, seed=1)
    F1 = K + H + 1  # thought passes after the text
    model(x, generator=torch.Generator().manual_seed(0), thought_tokens_per_backward=2 * G * F1 * 2)
    assert sizes[0] == (True, (2, 12))                                 # the text once per text
    assert sizes[-2:] == [(True, (2 * G, 2 * F1))] * 2                 # 2 groups of 2 positions
    assert sizes[1:-2] == [(False, (2 * G, 4))] * K                    # sampling: the 4 rows, no text


def test_held_gradients_equal_one_backward_with_scaling():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    shared = x @ w                                           # the shared part
    leaf = shared.detach().requires_grad_()
    pieces = [(leaf[:2] * w[:3, 0]).tanh().sum(), (leaf[2:] ** 2).sum() * w.sum()]
    held = HeldGradients([w, leaf])
    for piece in pieces:
        held.add(piece)
    loss = held.attach(sum(p.detach() for p in pieces), [w, shared])
    (0.5 * loss).backward()
    got = w.grad.clone()
    w.grad = None
    full = ((x @ w)[:2] * w[:3, 0]).tanh().sum() + ((x @ w)[2:] ** 2).sum() * w.sum()
    (0.5 * full).backward()
    torch.testing.assert_close(got, w.grad)
    torch.testing.assert_close(loss, full.detach())


def test_a_negative_token_budget_is_refused():
    model = build("rlp")
    with pytest.raises(QuietStarInputError, match="thought_tokens_per_backward must be >= 0"):
        model(random_text(1, 6, seed=1), thought_tokens_per_backward=-1)


@pytest.mark.parametrize("padded", [False, True])
def test_a_whole_thought_in_one_call_equals_naive_attention_with_gradients(monkeypatch, padded):
    """Every thought pass of selected rows in one CPU call (``score_rows``): the text part and
    the own part (causal over the row's passes) by the flash kernel, merged by log-sum-exp;
    values and gradients equal a per-row softmax, in float64."""
    from quietstar.method import attention
    from quietstar.method.selection import ThoughtRows
    from quietstar.method.thought_layout import PassKeys
    from test_selection import assert_equals_naive_rows_attention, rows_attention_inputs

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, D, P = 2, 4, 2, 40, 8, 5
    valid = torch.ones(B, L, dtype=torch.bool)
    if padded:
        valid[1, :3] = False
    rows = ThoughtRows.from_mask(torch.rand(B, L, generator=g) < 0.3)
    S = rows.index.shape[1]
    q, k, v, up = rows_attention_inputs(g, S, B=B, H=H, Hkv=Hkv, L=L, D=D, P=P)
    module = torch.nn.Identity()
    layout = attention.ThoughtLayout(L, tuple(range(1, P + 1)), valid, (valid.long().cumsum(-1) - 1).clamp(min=0),
                                     padded, {module: PassKeys.of_text(k[:, :, :L], v[:, :, :L])}, rows.index,
                                     flash_own=True)
    calls = []
    original = attention._WholeThoughtAttention.apply
    monkeypatch.setattr(attention._WholeThoughtAttention, "apply", lambda *args: calls.append(1) or original(*args))
    out = attention._thought_call(module, q, k[:, :, L:], v[:, :, L:], layout, D ** -0.5, 0.0, None, None)
    assert calls  # the whole-thought kernel ran
    assert_equals_naive_rows_attention(out, q, k, v, up, rows, valid, P)


def test_train_uses_the_grouped_backward_and_logs_the_same_step(tiny_model_dir, tmp_path, monkeypatch):
    """``train()`` with rlp scores the thoughts in groups (TrainConfig.thought_tokens_per_backward's
    default); 0 keeps one graph; the two log the same numbers."""
    import json

    from quietstar import TrainConfig, train
    from quietstar.training.config import load_config

    grouped = []
    original = QuietStarForCausalLM._successor_in_groups
    monkeypatch.setattr(QuietStarForCausalLM, "_successor_in_groups",
                        lambda self, *args: grouped.append(args[-1]) or original(self, *args))
    logged = {}
    for tokens in (TrainConfig().thought_tokens_per_backward, 0):
        settings = load_config("rlp").to_dict()
        settings.update(model=str(tiny_model_dir), output_dir=str(tmp_path / f"run{tokens}"), seq_len=16,
                        batch_size=1, max_steps=1, eval_every=0, sample_every=0, num_documents=20,
                        checkpoint_every=1, thought_tokens_per_backward=tokens)
        settings["quietstar"].update(sampled_thought_tokens=3, thoughts_per_position=2)
        train(TrainConfig.from_dict(settings))
        records = (tmp_path / f"run{tokens}" / "metrics.jsonl").read_text().splitlines()
        logged[tokens] = next(r for r in map(json.loads, records) if "policy_loss" in r)
    assert TrainConfig().thought_tokens_per_backward > 0
    assert grouped == [TrainConfig().thought_tokens_per_backward]  # the default's run only
    ours, theirs = logged.values()
    for name in ("loss", "policy_loss", "mean_reward", "reward_spread", "grad_norm"):
        assert ours[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), name
