"""Gradients, learning rates, save/load and bad input of QuietStarForCausalLM."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import make_lm, make_model, make_tokenizer, random_text
from quietstar import NonFiniteLossError, QuietStarConfig, QuietStarForCausalLM
from test_rollout import perturb_head


def test_nll_gradient_reaches_meta_embeddings_and_mixing_head():
    model = make_model("llama", policy_loss_weight=0.0)
    perturb_head(model)
    out = model(random_text(2, 12), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    meta_grad = model.embedding.scaled_vectors.grad
    assert meta_grad is not None and (meta_grad.abs().sum(-1) > 0).all()  # START and END both
    for p in model.mixing_head.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_mixing_head_learns_from_zero():
    """At w = 0 thoughts cannot matter yet; the head's last layer still gets a gradient."""
    model = make_model("llama")
    out = model(random_text(2, 12), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert model.mixing_head.mlp[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("multiplier", [1.0, 100.0])
def test_meta_token_lr_multiplier_under_adam(multiplier):
    model = make_model("llama", policy_loss_weight=0.0, meta_token_lr_multiplier=multiplier)
    perturb_head(model)
    lr = 1e-3
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    before_meta = model.embedding.meta_vectors.detach().clone()
    before_embed = model.lm.get_input_embeddings().weight.detach().clone()
    model(random_text(2, 12), generator=torch.Generator().manual_seed(0)).loss.backward()
    optimiser.step()
    meta_step = (model.embedding.meta_vectors.detach() - before_meta).abs().max()
    embed_step = (model.lm.get_input_embeddings().weight.detach() - before_embed).abs().max()
    # Adam's first step moves every parameter with a gradient by ~lr, whatever the gradient scale.
    torch.testing.assert_close(embed_step, torch.tensor(lr), rtol=1e-3, atol=0)
    torch.testing.assert_close(meta_step, torch.tensor(lr * multiplier), rtol=1e-3, atol=0)


def test_reinforce_raises_probability_of_the_better_thought():
    torch.manual_seed(0)
    model = make_model("llama", sampled_thought_tokens=1, ahead_tokens=2, thoughts_per_position=2,
                       base_loss_weight=0.0, mixed_loss_weight=0.0, policy_loss_weight=1.0)
    with torch.no_grad():  # w = 1: the prediction is the post-thought one
        model.mixing_head.mlp[-1].bias.fill_(1.0)
    x = random_text(1, 6, seed=11)
    # Find which of two candidate thought tokens helps predicting the text more, everywhere.
    a, b = torch.tensor(40), torch.tensor(41)
    gains = []
    for t in (a, b):
        scores = model.score_thoughts(x, t.expand(1, 6, 1))
        logp = torch.log_softmax(scores.mixed_logits[0, :4, 0], -1).gather(-1, x[0, 1:5, None])
        gains.append(logp.sum())
    better, worse = (a, b) if gains[0] > gains[1] else (b, a)

    forced = torch.stack([better, worse]).view(1, 2, 1, 1).expand(1, 2, 6, 1)

    def preference():
        with torch.no_grad():
            hidden = model.decoder(inputs_embeds=model.embedding(
                torch.cat([x[0, :3], torch.tensor([model.start_id])])[None])).last_hidden_state
            logp = torch.log_softmax(model.logits(hidden[0, -1]), -1)
        return (logp[better] - logp[worse]).item()

    before = preference()
    optimiser = torch.optim.SGD([p for n, p in model.named_parameters() if n.startswith("lm.")], lr=1.0)
    for _ in range(3):
        optimiser.zero_grad()
        out = model(x, thought_ids=forced)
        assert out.metrics["policy_loss"] > 0 and out.metrics["positive_reward_fraction"] == 0.5
        out.loss.backward()
        optimiser.step()
    assert preference() > before + 1e-3


def test_reward_baselines():
    x = random_text(2, 10)
    for baseline, n in (("thought_mean", 2), ("base", 1)):
        model = make_model("llama", reward_baseline=baseline, thoughts_per_position=n,
                           drop_negative_rewards=False)
        perturb_head(model)
        out = model(x, generator=torch.Generator().manual_seed(0))
        if baseline == "thought_mean":  # rewards are centred per position
            assert abs(out.metrics["mean_reward"]) < 1e-5
        else:  # reward = gain over the base model
            torch.testing.assert_close(out.metrics["mean_reward"], out.metrics["thought_gain"])
        assert 0 < out.metrics["positive_reward_fraction"] < 1


def test_bounded_mixing_weight_is_tanh_of_the_raw_output():
    """mixing_weight_bounded=True: w = tanh(the MLP's raw output), so |w| < 1 however large the
    raw output; 0 at initialisation (the base model); the gradient flows through the tanh."""
    free = make_model("llama")
    bounded = make_model("llama", mixing_weight_bounded=True)
    x = random_text(2, 9, seed=1)
    thoughts = random_text(18, 3, seed=2).view(2, 9, 3)
    at_init = bounded.score_thoughts(x, thoughts)
    assert torch.equal(at_init.mixing_weight, torch.zeros_like(at_init.mixing_weight))
    for s in range(3):  # w = 0: the mixed prediction of x_{i+1+s} is the base one at i+s
        torch.testing.assert_close(at_init.mixed_logits[:, :9 - s, s], at_init.base_logits[:, s:], atol=0, rtol=0)

    perturb_head(free)
    with torch.no_grad():
        free.mixing_head.mlp[-1].bias.fill_(1.5)  # raw outputs well beyond the bound
    bounded.mixing_head.load_state_dict(free.mixing_head.state_dict())
    raw, ours = free.score_thoughts(x, thoughts), bounded.score_thoughts(x, thoughts)
    assert raw.mixing_weight.abs().max() > 1.2
    torch.testing.assert_close(ours.mixing_weight, torch.tanh(raw.mixing_weight), atol=1e-6, rtol=0)
    assert ours.mixing_weight.abs().max() < 1
    # the mixed logits interpolate with the bounded w (Llama: no softcap, the head is linear)
    L = 9
    for s in range(3):
        w = ours.mixing_weight[:, :L - s, s, None]
        base = ours.base_logits[:, s:]
        expected = base + w * (ours.thought_logits[:, :L - s, s] - base)
        finite = torch.isfinite(expected)
        torch.testing.assert_close(ours.mixed_logits[:, :L - s, s][finite], expected[finite], atol=1e-5, rtol=0)

    # d w / d (last bias) = 1 - w^2, the tanh's derivative
    head = bounded.mixing_head
    g = torch.Generator().manual_seed(3)
    features = [torch.randn(5, 32, generator=g) for _ in range(2)]
    w = head.weight(*features)
    w.sum().backward()
    torch.testing.assert_close(head.mlp[-1].bias.grad, (1 - w.detach() ** 2).sum()[None], atol=1e-6, rtol=1e-6)
    head.zero_grad()
    bounded(x, generator=torch.Generator().manual_seed(0)).loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # rotary and learned absolute positions
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_contributes_nothing_to_the_loss(family, side):
    """A padded row's loss, metrics and gradients equal those of the same row unpadded: the
    padding tokens (arbitrary ids here, so that their content would show) and the targets that
    fall on them count nowhere: not in the NLLs, the rewards, nor the means' denominators."""
    model = make_model(family, thoughts_per_position=2, policy_loss_weight=10.0, drop_negative_rewards=False)
    perturb_head(model)
    model.double()  # float64: "nothing" is checked to 1e-10, not to float32's rounding
    L, pad = 8, 3
    x = random_text(1, L, seed=21)
    thoughts = random_text(2 * L, 3, seed=22).view(1, 2, L, 3)
    junk, junk_thoughts = random_text(1, pad, seed=23), random_text(2 * pad, 3, seed=24).view(1, 2, pad, 3)
    parts = [(junk, junk_thoughts, 0), (x, thoughts, 1)]
    if side == "right":
        parts.reverse()
    padded = torch.cat([p[0] for p in parts], 1)
    padded_thoughts = torch.cat([p[1] for p in parts], 2)
    mask = torch.cat([torch.full_like(p[0], p[2]) for p in parts], 1)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(*args, **kwargs):
        out = model(*args, **kwargs)
        return out, torch.autograd.grad(out.loss, params, allow_unused=True)

    alone, alone_grads = run(x, thought_ids=thoughts)
    with_pad, pad_grads = run(padded, mask, thought_ids=padded_thoughts)
    assert alone.metrics["policy_loss"] != 0  # every term takes part
    torch.testing.assert_close(with_pad.loss, alone.loss, atol=1e-10, rtol=1e-10)
    assert with_pad.metrics.keys() == alone.metrics.keys()
    for name, value in alone.metrics.items():
        torch.testing.assert_close(with_pad.metrics[name].double(), value.double(), atol=1e-10, rtol=1e-7, msg=name)
    for a, b in zip(alone_grads, pad_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-7)


def chunked_steps(family: str, **settings):
    """One training step (left padding) with all logits at once, then with chunks of 7 rows, the
    default chunk and chunks of 7 under activation checkpointing: [(output, gradients)] and the
    last model."""
    x = random_text(2, 12)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    results = []
    for chunk, checkpointing in ((0, False), (7, False), (QuietStarConfig().loss_chunk_tokens, False), (7, True)):
        model = make_model(family, loss_chunk_tokens=chunk, policy_loss_weight=10.0,
                           drop_negative_rewards=False, **settings)
        perturb_head(model)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(x, mask, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out, grads))
    return results, model


def assert_same_steps(results) -> None:
    """Every step of ``chunked_steps`` equals the first: thoughts, loss, metrics, gradients."""
    first, first_grads = results[0]
    for out, grads in results[1:]:
        assert torch.equal(out.thought_ids, first.thought_ids)
        torch.testing.assert_close(out.loss, first.loss)
        for name, value in first.metrics.items():
            torch.testing.assert_close(out.metrics[name], value, msg=name)
        torch.testing.assert_close(grads, first_grads, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: softcapped logits, tied head
def test_chunked_vocabulary_and_activation_checkpointing_match(family):
    """A training step with the vocabulary in chunks (the default, and chunks that split rows
    of one pass) equals the step with all logits at once: the same sampled thoughts from the
    same generator, loss, metrics and gradients; left padding and the meta-token mask included."""
    results, model = chunked_steps(family)
    assert model._meta_logit_ids.numel() > 0  # the meta tokens are inside the head's vocabulary
    assert_same_steps(results)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("settings", [
    {"thought_fraction": 0.5},                                             # entropy selection
    {"thought_fraction": 0.4, "thought_selection": "random", "thought_loss_weight": 0.7},
    {"thought_fraction": 0.5, "reward_source": "thought"},
])
def test_chunked_vocabulary_matches_with_thought_rows(family, settings):
    """With thought rows (thought_fraction < 1) every vocabulary-sized product goes through the
    chunked head: the entropy that chooses, the sampling, the REINFORCE log-probs, the base and
    mixed NLL and the post-thought NLL (thought_loss_weight, with gradient; reward_source
    "thought", without). Chunks of 7 rows, with and without activation checkpointing, equal
    all logits at once: the same positions and thoughts, loss, metrics and gradients."""
    results, _ = chunked_steps(family, **settings)
    first = results[0][0]
    assert first.thought_positions is not None and not first.thought_positions.all()
    for out, _ in results[1:]:
        assert torch.equal(out.thought_positions, first.thought_positions)
    assert_same_steps(results)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied and tied embeddings
def test_save_load_round_trip(tmp_path, family):
    model = make_model(family)
    perturb_head(model)
    with torch.no_grad():
        model.embedding.scaled_vectors.add_(0.01)  # learned meta tokens must survive the reload
        model.lm.get_input_embeddings().weight[5] += 1.0
    model.save_pretrained(tmp_path)
    loaded = QuietStarForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert (loaded.start_id, loaded.end_id) == (model.start_id, model.end_id)
    x = random_text(2, 9)
    thoughts = model.sample_thoughts(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        loaded.sample_thoughts(x, generator=torch.Generator().manual_seed(0)), thoughts)
    a, b = model.score_thoughts(x, thoughts), loaded.score_thoughts(x, thoughts)
    for field in ("base_logits", "thought_logits", "mixing_weight", "mixed_logits"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=0, rtol=0)
    # The saved base checkpoint is a plain transformers model.
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert plain.config.model_type == model.lm.config.model_type


def test_get_input_embeddings_returns_fed_vectors():
    model = make_model("gemma")
    emb = model.get_input_embeddings()
    ids = torch.tensor([[3, model.start_id, 7, model.end_id]])
    vectors = emb(ids)
    base = model.lm.get_input_embeddings()
    torch.testing.assert_close(vectors[0, 0], base(torch.tensor(3)))
    torch.testing.assert_close(vectors[0, 1], model.embedding.meta_vectors[0])
    torch.testing.assert_close(vectors[0, 3], model.embedding.meta_vectors[1])
    dash = model.tokenizer("---", add_special_tokens=False).input_ids[0]
    torch.testing.assert_close(vectors[0, 1], base(torch.tensor(dash)))  # initialised from "---"


# ---------------------------------------------------------------- bad input

def test_too_short_sequence():
    model = make_model("llama", ahead_tokens=4)
    with pytest.raises(ValueError, match="shorter than ahead_tokens \\+ 1 = 5"):
        model(random_text(1, 4))


def test_zero_length_thought():
    with pytest.raises(ValueError, match="sampled_thought_tokens must be an int >= 1"):
        QuietStarConfig(sampled_thought_tokens=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"ahead_tokens": 0}, "ahead_tokens"),
    ({"thoughts_per_position": 1}, "makes every reward 0"),
    ({"thought_temperature": -1.0}, "thought_temperature"),
    ({"policy_logprob_temperature": 0.0}, "policy_logprob_temperature"),
    ({"start_thought_token": "<x>", "end_thought_token": "<x>"}, "distinct"),
    ({"loss_chunk_tokens": -1}, "loss_chunk_tokens"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuietStarConfig(**kwargs)


def test_model_whose_attention_cannot_be_intercepted():
    lm = make_lm("llama")
    lm._supports_attention_backend = False  # as for models that hard-code their attention
    with pytest.raises(NotImplementedError, match="does not route its attention through"):
        QuietStarForCausalLM.from_base(lm, make_tokenizer(), QuietStarConfig())


def test_tokenizer_without_pad_token():
    with pytest.raises(ValueError, match="tokenizer has no pad token.*pad_token = tokenizer.eos_token"):
        QuietStarForCausalLM.from_base(make_lm(), make_tokenizer(pad=False), QuietStarConfig())


def test_mismatched_shapes():
    model = make_model("llama")
    x = random_text(2, 10)
    with pytest.raises(ValueError, match="attention_mask has shape \\(2, 9\\)"):
        model(x, attention_mask=torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="thought_ids must be \\[batch, length, k\\]"):
        model.score_thoughts(x, torch.zeros(2, 9, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be \\[batch, length\\]"):
        model(x[0])
    with pytest.raises(ValueError, match="contain the thought meta tokens"):
        model(x.masked_fill(x == x[0, 0], model.start_id))


def test_nan_loss():
    model = make_model("llama", thought_temperature=0.0)  # greedy thoughts: only the loss sees NaN
    with torch.no_grad():
        model.lm.get_output_embeddings().weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="loss is nan .*lower the learning rate"):
        model(random_text(1, 10))
    model.config.thought_temperature = 1.0  # NaN sampling logits must not crash the sampler
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        model(random_text(1, 10))


def test_corrupt_or_incomplete_checkpoint(tmp_path):
    model = make_model("llama")
    model.save_pretrained(tmp_path)
    (tmp_path / "quietstar_head.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="quietstar_head.safetensors is corrupt"):
        QuietStarForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "quietstar_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a saved QuietStar model: quietstar_config.json"):
        QuietStarForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_from_another_model(tmp_path):
    small = make_model("llama")
    small.save_pretrained(tmp_path / "a")
    other = QuietStarForCausalLM.from_base(
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=336, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2)), make_tokenizer(), QuietStarConfig())
    other.save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "quietstar_head.safetensors").replace(tmp_path / "b" / "quietstar_head.safetensors")
    with pytest.raises(ValueError, match="does not fit this model"):
        QuietStarForCausalLM.from_pretrained(tmp_path / "b")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_inference_takes_any_length_and_equals_the_longer_text(family):
    """score_thoughts and base_logits take texts shorter than ahead_tokens + 1 (down to one token):
    what a position predicts after its thought depends only on the text up to it, so a prefix
    scores exactly as the same positions of the whole text."""
    model = make_model(family)
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.4)
    x = random_text(2, 7, seed=1)
    thoughts = random_text(14, 3, seed=2).view(2, 7, 3)
    with torch.no_grad():
        whole = model.score_thoughts(x, thoughts)
        for m in (1, 2, 3):
            part = model.score_thoughts(x[:, :m], thoughts[:, :m])
            for name in ("base_logits", "thought_logits", "mixed_logits"):
                ours = getattr(part, name)
                ours = ours if name == "base_logits" else ours[:, :, 0]
                ref = getattr(whole, name)[:, :m]
                ref = ref if name == "base_logits" else ref[:, :, 0]
                torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(model.base_logits(x[:, :m]), whole.base_logits[:, :m], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="length >= 1"):
        model.base_logits(x[:, :0])
