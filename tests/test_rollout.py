"""The parallel rollout equals generating each position's thought on its own."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import FAMILIES, TOKENIZER_SIZE, make_lm, make_tokenizer, random_text
from quietstar import QuietStarConfig, QuietStarForCausalLM

K, A = 3, 3


def wrap(family, vocab_size=None, **kw):
    lm = make_lm(family, vocab_size=vocab_size)
    reference = copy.deepcopy(lm)  # untouched base model with ordinary eager attention
    config = QuietStarConfig(**{"sampled_thought_tokens": K, "ahead_tokens": A, **kw})
    return QuietStarForCausalLM.from_base(lm, make_tokenizer(), config), reference


def perturb_head(model, seed=0):
    """Give the mixing head a non-zero output so thoughts change the mixed prediction."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last = model.mixing_head.mlp[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.5)
        last.bias.fill_(0.3)


def sequential_logits(model, reference, text, i, thought):
    """Plain base model on [x_0..x_i, START, thought, END, x_{i+1}..x_{i+A-1}] (no padding)."""
    seq = torch.cat([text[:i + 1], torch.tensor([model.start_id]), thought,
                     torch.tensor([model.end_id]), text[i + 1:i + A]])
    with torch.no_grad():
        logits = reference(inputs_embeds=model.get_input_embeddings()(seq[None])).logits[0]
    return logits


def mix_logits(model, base, thought, w):
    """Interpolation of the pre-softcap logits (the LM head is linear in the hidden state)."""
    cap = getattr(model.lm.config, "final_logit_softcapping", None)
    if cap is None:
        return base + w * (thought - base)
    base, thought = cap * torch.atanh(base / cap), cap * torch.atanh(thought / cap)
    return cap * torch.tanh((base + w * (thought - base)) / cap)


def assert_close_finite(actual, expected, model, atol=1e-4):
    """Equal to the plain model's logits, with the meta tokens the one exception: the wrapped
    model never predicts them (-inf where they lie inside the LM head), the plain model knows
    nothing of that. Every other entry must be finite in both, then equal in value."""
    V = actual.shape[-1]
    expected = expected[..., :V]
    meta = torch.zeros(V, dtype=torch.bool)
    meta[[i for i in (model.start_id, model.end_id) if i < V]] = True
    assert torch.isfinite(expected).all(), "the plain model's logits are not all finite"
    assert (actual[..., meta] == float("-inf")).all(), "a meta token is predictable"
    assert torch.isfinite(actual[..., ~meta]).all(), "non-finite logits outside the meta tokens"
    torch.testing.assert_close(actual[..., ~meta], expected[..., ~meta], atol=atol, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("head", ["meta-in-head", "meta-beyond-head"])
def test_parallel_equals_sequential(family, padding, head):
    # meta-beyond-head: the LM head has exactly the tokenizer's rows and the meta tokens' ids lie
    # beyond it, as in every real model (the tiny default leaves room for them inside the head).
    model, reference = wrap(family, vocab_size=TOKENIZER_SIZE if head == "meta-beyond-head" else None)
    V = model.lm.get_output_embeddings().weight.shape[0]
    assert (min(model.start_id, model.end_id) >= V) == (head == "meta-beyond-head")
    B, L = 2, 11
    x = random_text(B, L, seed=3)
    mask = torch.ones_like(x)
    lengths = [L, L]
    if padding != "none":
        lengths = [L, L - 4]
        if padding == "right":
            mask[1, L - 4:] = 0
        else:
            mask[1, :4] = 0
    thoughts = random_text(B * L, K, seed=4).view(B, L, K)
    scores = model.score_thoughts(x, thoughts, mask)
    perturb_head(model)
    mixed_scores = model.score_thoughts(x, thoughts, mask)

    for b in range(B):
        keep = mask[b].bool()
        text = x[b][keep]  # the row as it would be with no padding at all
        columns = keep.nonzero().flatten()
        with torch.no_grad():
            plain = reference(inputs_embeds=model.get_input_embeddings()(text[None])).logits[0]
        assert_close_finite(scores.base_logits[b, columns], plain, model)
        for i in range(lengths[b]):
            col = columns[i]
            logits = sequential_logits(model, reference, text, i, thoughts[b, col])
            end = i + 1 + K + 1  # index of END in the sequential sequence
            for s in range(min(A, lengths[b] - i)):
                assert_close_finite(scores.thought_logits[b, col, s], logits[end + s], model)
                # mixed logits interpolate base (at i+s) and post-thought logits with weight w
                w = mixed_scores.mixing_weight[b, col, s]
                expected = mix_logits(model, plain[i + s], logits[end + s], w)
                assert_close_finite(mixed_scores.mixed_logits[b, col, s], expected, model)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_sampling_pass_equals_sequential(family):
    """Greedy thoughts from the cached parallel sampler are the sequential greedy thoughts."""
    model, reference = wrap(family)
    x = random_text(1, 9, seed=5)
    thoughts = model.sample_thoughts(x, temperature=0.0)
    assert thoughts.shape == (1, 9, K)
    emb = model.get_input_embeddings()
    for i in range(9):
        seq = torch.cat([x[0, :i + 1], torch.tensor([model.start_id])])
        for j in range(K):
            with torch.no_grad():
                logits = reference(inputs_embeds=emb(seq[None])).logits[0, -1]
            logits[[model.start_id, model.end_id]] = float("-inf")
            token = logits.argmax()
            assert thoughts[0, i, j] == token, (i, j)
            seq = torch.cat([seq, token[None]])


def test_sampled_thoughts_exclude_meta_tokens_and_reproduce():
    model, _ = wrap("llama", thought_temperature=5.0)
    # Make the meta tokens the most likely next tokens of the raw LM: they must still never appear.
    with torch.no_grad():
        head = model.lm.get_output_embeddings()
        head.weight[[model.start_id, model.end_id]] = head.weight.abs().max() * 50
    x = random_text(3, 20, seed=6)
    a = model.sample_thoughts(x, generator=torch.Generator().manual_seed(1))
    b = model.sample_thoughts(x, generator=torch.Generator().manual_seed(1))
    c = model.sample_thoughts(x, generator=torch.Generator().manual_seed(2))
    assert not ((a == model.start_id) | (a == model.end_id)).any()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(a.unique()) > 20  # temperature 5: really sampled, not collapsed


def test_mixed_prediction_equals_base_at_initialisation():
    model, reference = wrap("qwen2")
    x = random_text(2, 10, seed=7)
    thoughts = model.sample_thoughts(x)
    scores = model.score_thoughts(x, thoughts)
    assert torch.equal(scores.mixing_weight, torch.zeros_like(scores.mixing_weight))
    for s in range(A):
        torch.testing.assert_close(scores.mixed_logits[:, :10 - s, s], scores.base_logits[:, s:])
    with torch.no_grad():
        plain = reference(x).logits
    assert_close_finite(scores.base_logits, plain, model, atol=1e-5)


def test_training_forward_uses_score_thoughts_path(monkeypatch):
    """The loss of a training forward is computed from score_thoughts' numbers."""
    model, _ = wrap("llama", thoughts_per_position=2, policy_loss_weight=0.0)
    perturb_head(model)
    x = random_text(1, 8, seed=8)
    out = model(x, generator=torch.Generator().manual_seed(0))
    thoughts = out.thought_ids[0]  # [n, L, k]
    scores = model.score_thoughts(x.repeat(2, 1), thoughts)
    logp = torch.log_softmax(scores.mixed_logits, -1)
    nll = []
    for s in range(A):
        targets = x[0, 1 + s:]
        nll.append(-logp[:, :8 - 1 - s, s].gather(-1, targets.expand(2, -1)[..., None]).mean())
    base = -torch.log_softmax(scores.base_logits, -1)[:, :-1].gather(-1, x[:, 1:].expand(2, -1)[..., None]).mean()
    torch.testing.assert_close(torch.stack([out.metrics[f"mixed_nll_{s + 1}"] for s in range(A)]), torch.stack(nll))
    torch.testing.assert_close(out.metrics["base_nll"], base)
    torch.testing.assert_close(out.loss, 0.5 * base + 0.5 * torch.stack(nll).mean())



def test_rollout_is_built_from_the_modules_the_model_holds_now():
    """``model.rollout`` holds the model's constants and is built on access, so a module swapped
    in after construction (as FSDP, DeepSpeed or peft wrap the embedding or the LM) is the one
    its passes run through."""
    model, _ = wrap("llama")
    rollout = model.rollout
    assert rollout.decoder is model.lm.get_decoder() and rollout.embed is model.embedding
    assert (rollout.start_id, rollout.end_id, rollout.ahead_tokens, rollout.pad_id) == (
        model.start_id, model.end_id, A, model.tokenizer.pad_token_id)
    x = random_text(2, 6, seed=5)
    thoughts = model.sample_thoughts(x, generator=torch.Generator().manual_seed(0))
    before = model.score_thoughts(x, thoughts)
    calls = []

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            calls.append(ids.shape)
            return self.inner(ids)

    model.embedding = Wrapped(model.embedding)
    assert model.rollout.embed is model.embedding
    after = model.score_thoughts(x, thoughts)
    assert calls and torch.equal(after.mixed_logits, before.mixed_logits)

def step_runner(family, **kw):
    """A float64 tiny model (perturbed head) and a left-padded batch: (model, x, mask, run), where
    ``run(**forward_kwargs)`` is one training forward and its gradients."""
    model, _ = wrap(family, thoughts_per_position=2, policy_loss_weight=10.0,
                    drop_negative_rewards=False, thought_temperature=2.0, **kw)
    model.double()
    perturb_head(model)
    x = random_text(2, 9, seed=12)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding
    params = [p for p in model.parameters() if p.requires_grad]

    def run(**forward_kwargs):
        out = model(x, mask, **forward_kwargs)
        return out, torch.autograd.grad(out.loss, params, allow_unused=True)

    return model, x, mask, run


def assert_same_step(a, b, a_grads, b_grads) -> None:
    """Two training forwards agree: loss, every metric, every gradient."""
    torch.testing.assert_close(b.loss, a.loss, atol=1e-10, rtol=1e-9)
    assert b.metrics.keys() == a.metrics.keys()
    for name, value in a.metrics.items():
        torch.testing.assert_close(b.metrics[name], value, atol=1e-10, rtol=1e-9, msg=name)
    for g1, g2 in zip(a_grads, b_grads):
        assert (g1 is None) == (g2 is None)
        if g1 is not None:
            # float32 precision, not float64: Gemma's norms compute in float32 in any dtype.
            torch.testing.assert_close(g1, g2, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_single_pass_training_equals_grid_scoring_with_gradients(family):
    """Training samples and scores thoughts in the same passes (each pass runs once, keys kept
    per pass); its thoughts, loss parts and every gradient equal sampling without gradients and
    then scoring the grid in one forward, which replays and activation checkpointing use."""
    model, x, mask, run = step_runner(family)
    online, online_grads = run(generator=torch.Generator().manual_seed(3))
    sampled = model.sample_thoughts(x.repeat_interleave(2, 0), mask.repeat_interleave(2, 0),
                                    generator=torch.Generator().manual_seed(3))
    assert torch.equal(online.thought_ids.flatten(0, 1), sampled)
    assert len(sampled.unique()) > 10
    model.activation_checkpointing_enable()
    model.train()
    for other, other_grads in (run(thought_ids=online.thought_ids),
                               run(generator=torch.Generator().manual_seed(3))):
        assert torch.equal(other.thought_ids, online.thought_ids)
        assert_same_step(online, other, online_grads, other_grads)
    assert sum(g.abs().sum() for g in online_grads if g is not None) > 0


def count_calls(model, monkeypatch):
    """Records every decoder call (batch rows, query rows, gradients on?) and every attention
    call of every layer (query rows), forward and backward recomputation alike."""
    decoder_calls, attention_calls = [], []
    decoder = model.decoder
    decoder_forward = decoder.forward

    def counting_decoder(*args, **kwargs):
        embeds = kwargs["inputs_embeds"]
        decoder_calls.append((embeds.shape[0], embeds.shape[1], torch.is_grad_enabled()))
        return decoder_forward(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", counting_decoder)
    for index, layer in enumerate(decoder.layers):
        def counting_attention(*args, _forward=layer.self_attn.forward, _index=index, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            attention_calls.append((_index, hidden.shape[1]))
            return _forward(*args, **kwargs)

        monkeypatch.setattr(layer.self_attn, "forward", counting_attention)
    return decoder_calls, attention_calls


@pytest.mark.parametrize("checkpointing", [False, True], ids=["passes", "checkpointed"])
def test_training_step_runs_each_pass_once(monkeypatch, checkpointing):
    """The efficiency claim as a count: a training forward runs each of the F = k + A + 2 passes
    once, in k + 1 decoder calls whose query rows add up to F*L per sequence row (text and START
    share the first, the A + 1 passes after the last sampled token the last), all with gradients,
    and the backward recomputes nothing. With activation checkpointing (documented in
    quietstar.method.rollout): k calls sampling the thoughts without gradients (passes 0..k-1), then the
    F-pass grid in ONE call with gradients, which the backward recomputes once per layer."""
    k, A, n, B, L = 4, 2, 2, 2, 7
    model, _ = wrap("llama", sampled_thought_tokens=k, ahead_tokens=A, thoughts_per_position=n)
    F = model.config.passes_per_step
    assert F == k + A + 2
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable()
    decoder_calls, attention_calls = count_calls(model, monkeypatch)
    out = model(random_text(B, L, seed=13), generator=torch.Generator().manual_seed(0))
    layers = len(model.decoder.layers)
    forward_attention = list(attention_calls)
    attention_calls.clear()
    out.loss.backward()
    assert len(decoder_calls) == k + 1
    assert all(rows == B * n for rows, _, _ in decoder_calls)
    if not checkpointing:
        assert [(q, grad) for _, q, grad in decoder_calls] == [(2 * L, True)] + [(L, True)] * (k - 1) + [
            ((A + 1) * L, True)]
        assert sum(q for _, q, _ in decoder_calls) == F * L
        assert attention_calls == []  # nothing recomputed in the backward
    else:
        assert [(q, grad) for _, q, grad in decoder_calls] == [(2 * L, False)] + [(L, False)] * (k - 1) + [
            (F * L, True)]
        assert sorted(attention_calls) == [(i, F * L) for i in range(layers)]  # the grid, recomputed once
    # every layer's attention saw exactly the decoder calls' queries
    assert sorted(forward_attention) == sorted((i, q) for i in range(layers) for _, q, _ in decoder_calls)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("query_passes", [(0, 1, 2, 3), (2,), (0,)])
def test_fused_attention_equals_general_with_gradients(padded, query_passes):
    """The fused CPU kernel path (flash + log-sum-exp merge) matches the plain tensor-op path,
    values and gradients, including the gradient that flows through the log-sum-exp."""
    from quietstar.method.attention import PassKeys, ThoughtLayout, _fused_thought_attention, _general_thought_attention

    torch.manual_seed(0)
    B, H, Hkv, L, D = 2, 4, 2, 6, 8
    P = max(query_passes)
    valid = torch.ones(B, L, dtype=torch.bool)
    if padded:
        valid[1, :2] = False
    layout = ThoughtLayout(L, query_passes, valid, (valid.long().cumsum(-1) - 1).clamp(min=0), padded)
    q = torch.randn(B, H, len(query_passes) * L, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, (P + 1) * L, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, (P + 1) * L, D, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(B, len(query_passes) * L, H, D, dtype=torch.float64)
    results = []
    for fn in (_fused_thought_attention, _general_thought_attention):
        keys = PassKeys()
        keys.add(k.split(L, 2), v.split(L, 2))
        out, _ = fn(q, keys, layout, D ** -0.5)
        grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
        results.append((out, *grads))
    for fused, general in zip(*results):
        torch.testing.assert_close(fused, general, atol=1e-10, rtol=1e-8)


def test_own_thought_products_equal_einsum_with_gradients():
    """The own-thought scores and value sums (batched products on PassKeys' buffer, filled over
    several calls as in a rollout) equal the plain einsum over stacked blocks, with gradients."""
    from quietstar.method.attention import PassKeys, _own_scores, _own_values

    g = torch.Generator().manual_seed(0)
    B, Hkv, G, Qp, L, D, P = 2, 2, 3, 4, 5, 8, 6
    q = torch.randn(B, Hkv, G, Qp, L, D, dtype=torch.float64, generator=g, requires_grad=True)
    probs = torch.rand(B, Hkv, G, Qp, L, P, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, (P + 1) * L, D, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, (P + 1) * L, D, dtype=torch.float64, generator=g, requires_grad=True)
    up_s = torch.randn(B, Hkv, G, Qp, L, P, dtype=torch.float64, generator=g)
    up_v = torch.randn(B, Hkv, G, Qp, L, D, dtype=torch.float64, generator=g)
    inputs = (q, probs, k, v)
    store = PassKeys()
    for calls in ((0, 1), (2,), (3, 4, 5), (6,)):  # the buffer grows past its first capacity
        store.add(k[:, :, calls[0] * L:(calls[-1] + 1) * L].split(L, 2),
                  v[:, :, calls[0] * L:(calls[-1] + 1) * L].split(L, 2))
    ours = (_own_scores(q, store, 0.5, torch.float64), _own_values(probs, store))
    k_own, v_own = k[:, :, L:].view(B, Hkv, P, L, D), v[:, :, L:].view(B, Hkv, P, L, D)
    reference = (torch.einsum("bkgqld,bkpld->bkgqlp", q, k_own) * 0.5,
                 torch.einsum("bkgqlp,bkpld->bkgqld", probs, v_own))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    grads = [torch.autograd.grad((s * up_s).sum() + (m * up_v).sum(), inputs) for s, m in (ours, reference)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def bf16_error_in_spreads(model, x, thoughts) -> float:
    """Largest |bf16 - fp32| post-thought logit, in units of the fp32 logits' standard deviation
    (the finite patterns must be equal: the meta tokens -inf in both)."""
    reference = model.score_thoughts(x, thoughts).thought_logits
    low = model.to(torch.bfloat16).score_thoughts(x, thoughts).thought_logits.float()
    model.to(torch.float32)
    finite = torch.isfinite(reference)
    assert torch.equal(finite, torch.isfinite(low))
    return ((low[finite] - reference[finite]).abs().max() / reference[finite].std()).item()


def test_bfloat16_thought_scoring_runs_and_tracks_float32():
    # Measured 0.022 spreads (an absolute 0.0025 on logits whose spread is 0.114); bf16 keeps 8 bits.
    model, _ = wrap("llama")
    x = random_text(1, 10, seed=9)
    thoughts = random_text(10, K, seed=10).view(1, 10, K)
    assert bf16_error_in_spreads(model, x, thoughts) < 0.1


@pytest.mark.parametrize("contraction", [1, 3, 7, 8, 13])
def test_small_matmul_equals_matmul(contraction):
    """The unrolled product for short contractions (and the plain one for long) on the strided
    operands the own-thought part passes (transposed views)."""
    from quietstar.method.attention import _small_matmul

    g = torch.Generator().manual_seed(contraction)
    a = torch.randn(2, 3, 5, contraction, 4, dtype=torch.float64, generator=g).transpose(-1, -2)
    b = torch.randn(2, 3, 5, 6, contraction, dtype=torch.float64, generator=g).transpose(-1, -2)
    torch.testing.assert_close(_small_matmul(a, b), torch.matmul(a, b), atol=1e-12, rtol=1e-12)
