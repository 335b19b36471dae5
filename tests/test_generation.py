"""Tests for quietstar.method.generation (cached thinking generation) and the `quietstar generate` command
(quietstar.cli.generate).

The reference for every number is ``score_thoughts``, the uncached rollout that training uses:
a generation step must give the same next-token distribution for the same text and thought.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_script, make_model, random_text
from torch import nn

from quietstar.cli import main as cli
from quietstar.method.generation import generate
from quietstar.method.sampling import filter_logits, sample

K = 3  # thought length of the tiny models (make_model's default)


def _perturb_mixing_head(model, seed=0):
    """A trained-looking head: w != 0, so the thought really changes the prediction."""
    g = torch.Generator().manual_seed(seed)
    last = model.mixing_head.mlp[-1]
    with torch.no_grad():
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.5)
        last.bias.fill_(1.0)
    return model


def _left_pad(prompts, pad_id):
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = p
        mask[i, L - len(p):] = 1
    return ids, mask


# ------------------------------------------------------------------ equivalence with score_thoughts
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])
def test_step_distribution_equals_score_thoughts(family):
    # mistral: sliding window 7 < prompt (8) + thought (5); gemma2: softcaps + sliding window 6.
    model = _perturb_mixing_head(make_model(family))
    prompt = random_text(1, 8, seed=1)
    steps = 3
    out = generate(model, prompt, max_new_tokens=steps, thought_temperature=1.0, eos_token_id=[],
                   return_thoughts=True, output_logits=True, generator=torch.Generator().manual_seed(0))
    assert out.thought_ids.shape == (1, steps, K)
    for s in range(steps):
        # Step s predicts token L+s from the prompt and the first s new tokens: the crop of every
        # earlier thought must leave exactly what score_thoughts sees.
        text = out.sequences[:, :8 + s]
        thoughts = random_text(1, text.shape[1] * K, seed=s).view(1, -1, K)  # any other thoughts
        thoughts[0, -1] = out.thought_ids[0, s]
        scores = model.score_thoughts(text, thoughts)
        expected = scores.mixed_logits[0, -1, 0].log_softmax(-1)
        got = out.logits[s][0].log_softmax(-1)
        assert (got.exp() - expected.exp()).abs().max() < 1e-4
        real = torch.isfinite(expected)  # the meta tokens are -inf in both
        assert torch.equal(real, torch.isfinite(got))
        assert (got[real] - expected[real]).abs().max() < 1e-4  # log-probabilities too: stricter
        assert out.mixing_weight[0, s] == pytest.approx(scores.mixing_weight[0, -1, 0].item(), abs=1e-4)
        # Meaningful: the thought moved the prediction away from the base model's.
        base = scores.base_logits[0, -1].log_softmax(-1)
        assert (expected[real] - base[real]).abs().max() > 2e-3  # 20x the tolerance
        assert out.sequences[0, 8 + s] == got.argmax()


# ------------------------------------------------------------------ batching and padding
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])
def test_left_padded_batch_equals_one_by_one(family):
    model = _perturb_mixing_head(make_model(family))
    prompts = [random_text(1, n, seed=i)[0] for i, n in enumerate([5, 9, 3])]
    ids, mask = _left_pad(prompts, model.tokenizer.pad_token_id)
    batched = generate(model, ids, mask, max_new_tokens=10, thought_temperature=0, eos_token_id=[],
                       return_thoughts=True)
    for i, p in enumerate(prompts):
        single = generate(model, p[None], max_new_tokens=10, thought_temperature=0, eos_token_id=[],
                          return_thoughts=True)
        assert torch.equal(batched.sequences[i, ids.shape[1]:], single.sequences[0, len(p):])
        assert torch.equal(batched.thought_ids[i], single.thought_ids[0])


def test_rows_stop_at_eos_and_are_padded():
    model = _perturb_mixing_head(make_model("llama"))
    ids = random_text(2, 6, seed=3)
    run = dict(max_new_tokens=8, do_sample=True, thought_temperature=1.0)  # sampled: varied tokens
    free = generate(model, ids, eos_token_id=[], generator=torch.Generator().manual_seed(0), **run)
    row0, row1 = free[0, 6:].tolist(), free[1, 6:].tolist()
    # The end of sequence: a token row 0 emits first at step s >= 1 and row 1 never emits.
    s = next(s for s in range(1, 8) if row0[s] not in row0[:s] + row1)
    eos, pad = row0[s], model.tokenizer.pad_token_id
    # The same random draws: a finished row is still sampled, then overwritten with the pad id.
    out = generate(model, ids, eos_token_id=eos, return_thoughts=True,
                   generator=torch.Generator().manual_seed(0), **run)
    assert torch.equal(out.sequences[0, :6 + s + 1], free[0, :6 + s + 1])
    assert (out.sequences[0, 6 + s + 1:] == pad).all()
    assert (out.thought_ids[0, s + 1:] == pad).all() and (out.mixing_weight[0, s + 1:] == 0).all()
    assert torch.equal(out.sequences[1], free[1])

    # Generation stops as soon as every row has finished (row 1 at once, row 0 at step s or before).
    ends = {eos, row1[0]}
    last = next(i for i, t in enumerate(row0) if t in ends)
    out = generate(model, ids, eos_token_id=list(ends), generator=torch.Generator().manual_seed(0), **run)
    assert out.shape[1] == 6 + last + 1 < 6 + 8


def test_right_padding_and_meta_prompts_are_refused():
    model = make_model("llama")
    ids = random_text(2, 5)
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left"):
        generate(model, ids, mask, max_new_tokens=2)
    ids[1, 2] = model.start_id
    with pytest.raises(ValueError, match="meta tokens"):
        generate(model, ids, max_new_tokens=2)


# ------------------------------------------------------------------ meta tokens, top-k, top-p
def _bias_meta_logits(model, value=30.0):
    """Gives the LM head a bias that makes START/END the most likely tokens everywhere."""
    head = model.lm.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[[model.start_id, model.end_id]] = value
    model.lm.set_output_embeddings(biased)
    return model


def test_meta_tokens_are_never_emitted():
    model = _bias_meta_logits(_perturb_mixing_head(make_model("llama")))
    ids = random_text(8, 5, seed=4)
    raw = model.lm(ids).logits.argmax(-1)  # without the mask, the meta tokens would win
    assert ((raw == model.start_id) | (raw == model.end_id)).all()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        out = generate(model, ids, max_new_tokens=12, do_sample=True, temperature=2.0,
                       thought_temperature=2.0, eos_token_id=[], return_thoughts=True, generator=g)
        for t in (out.sequences[:, 5:], out.thought_ids):
            assert not ((t == model.start_id) | (t == model.end_id)).any()


def test_sample_matches_the_distribution_and_never_draws_zero_probability_tokens():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    logits = probs.log().expand(40000, -1)
    draws = sample(logits, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    assert freq[probs == 0].sum() == 0
    assert (freq - probs).abs().max() < 0.01
    # temperature 0.5 squares the probabilities (then renormalises)
    sharp = probs ** 2 / (probs ** 2).sum()
    freq = torch.bincount(sample(logits, 0.5, torch.Generator().manual_seed(1)), minlength=6) / 40000
    assert (freq - sharp).abs().max() < 0.01


def test_filter_logits_keeps_exactly_top_k_and_the_nucleus():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.25, 0.2]])
    logits = probs.log()
    kept = lambda f: set(torch.nonzero(f[0] > float("-inf")).flatten().tolist())  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == {1, 3}
    # nucleus: the most likely tokens until their probability reaches top_p
    assert kept(filter_logits(logits, top_p=0.6)) == {1, 3}        # 0.4 + 0.25 >= 0.6
    assert kept(filter_logits(logits, top_p=0.66)) == {1, 3, 4}    # 0.65 < 0.66
    assert kept(filter_logits(logits, top_p=0.1)) == {1}           # always at least one
    assert kept(filter_logits(logits, top_k=2, top_p=0.3)) == {1}


def _allowed(logits, temperature, top_k=None, top_p=None):
    """The tokens top-k / top-p sampling may pick, computed from the distribution directly."""
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    allowed = set(order[:top_k].tolist()) if top_k else set(order.tolist())
    if top_p is not None:
        nucleus, total = set(), 0.0
        for i in order.tolist():
            nucleus.add(i)
            total += probs[i].item()
            if total >= top_p:
                break
        allowed &= nucleus
    return allowed


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.3), (4, 0.5)])
def test_top_k_top_p_restrict_the_sampled_tokens(top_k, top_p):
    model = _perturb_mixing_head(make_model("llama"))
    ids = random_text(6, 5, seed=5)
    g = torch.Generator().manual_seed(0)
    outside = 0
    for restricted in (True, False):
        out = generate(model, ids, max_new_tokens=10, do_sample=True, temperature=1.5,
                       top_k=top_k if restricted else None, top_p=top_p if restricted else None,
                       eos_token_id=[], output_logits=True, generator=g)
        for s, step_logits in enumerate(out.logits):
            for b in range(ids.shape[0]):
                token = int(out.sequences[b, 5 + s])
                inside = token in _allowed(step_logits[b], 1.5, top_k, top_p)
                if restricted:
                    assert inside
                else:
                    outside += not inside
    assert outside > 0, "unrestricted sampling should leave the allowed set sometimes"


# ------------------------------------------------------------------ the base model
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_zero_thought_tokens_is_the_base_models_generate(family):
    model = make_model(family)
    model.lm.generation_config.pad_token_id = model.tokenizer.pad_token_id
    prompts = [random_text(1, n, seed=i)[0] for i, n in enumerate([4, 7])]
    ids, mask = _left_pad(prompts, model.tokenizer.pad_token_id)
    ours = generate(model, ids, mask, max_new_tokens=15, thought_tokens=0)
    theirs = model.lm.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False)
    assert torch.equal(ours, theirs)


def test_untrained_head_generates_as_the_base_model_even_while_thinking():
    model = make_model("llama")  # w = 0 at initialisation
    ids = random_text(2, 6, seed=6)
    thinking = generate(model, ids, max_new_tokens=12, eos_token_id=[])
    plain = generate(model, ids, max_new_tokens=12, eos_token_id=[], thought_tokens=0)
    assert torch.equal(thinking, plain)


# ------------------------------------------------------------------ outputs and streaming
class RecordingStreamer:
    def __init__(self):
        self.events = []

    def put(self, ids):
        self.events.append(("put", ids.tolist()))

    def put_thought(self, ids):
        self.events.append(("thought", ids.tolist()))

    def end(self):
        self.events.append(("end",))


def test_return_thoughts_and_streamer_agree():
    model = _perturb_mixing_head(make_model("llama"))
    ids = random_text(1, 6, seed=7)
    streamer = RecordingStreamer()
    out = generate(model, ids, max_new_tokens=4, thought_tokens=2, thought_temperature=0,
                   eos_token_id=[], streamer=streamer, return_thoughts=True)
    assert out.thought_ids.shape == (1, 4, 2) and out.mixing_weight.shape == (1, 4)
    assert out.thoughts[0] == [model.tokenizer.decode(t) for t in out.thought_ids[0].tolist()]
    expected = [("put", ids.tolist())]
    for s in range(4):
        expected += [("thought", out.thought_ids[0, s].tolist()), ("put", [int(out.sequences[0, 6 + s])])]
    assert streamer.events == expected + [("end",)]
    with pytest.raises(ValueError, match="one prompt"):
        generate(model, random_text(2, 6), max_new_tokens=1, streamer=RecordingStreamer())


def test_thought_tokens_sets_the_thought_length_and_config_defaults_apply():
    model = make_model("llama", sampled_thought_tokens=2, thought_temperature=0.0)
    ids = random_text(1, 5)
    out = generate(model, ids, max_new_tokens=3, return_thoughts=True)
    assert out.thought_ids.shape == (1, 3, 2)
    again = generate(model, ids, max_new_tokens=3, return_thoughts=True)  # greedy thoughts
    assert torch.equal(out.thought_ids, again.thought_ids)
    assert generate(model, ids, max_new_tokens=3, thought_tokens=5,
                    return_thoughts=True).thought_ids.shape == (1, 3, 5)


# ------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model = _perturb_mixing_head(make_model("llama"))
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    return model, directory


def _cli(capsys, *args):
    assert cli.main(["generate", *map(str, args)]) == 0
    return capsys.readouterr()


def test_cli_prints_the_greedy_continuation(saved_model, capsys):
    model, directory = saved_model
    prompt = "How many clips did Natalia sell"
    out = _cli(capsys, "--model", directory, "--prompt", prompt, "--max-new-tokens", 6,
               "--thought-temperature", 0, "--device", "cpu").out
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    expected = generate(model, ids, max_new_tokens=6, thought_temperature=0)
    text = model.tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert out == text + "\n" and text.strip()


def test_cli_shows_thoughts_bracketed_or_dimmed(saved_model, capsys):
    model, directory = saved_model
    prompt = "The quick brown fox"
    args = ["--model", directory, "--prompt", prompt, "--max-new-tokens", 5, "--thought-tokens", 2,
            "--thought-temperature", 0, "--show-thoughts"]
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    ref = generate(model, ids, max_new_tokens=5, thought_tokens=2, thought_temperature=0,
                   return_thoughts=True)
    plain = _cli(capsys, *args).out  # captured stdout is no terminal: brackets
    assert plain.count("«") == 5 and plain.startswith("«" + ref.thoughts[0][0].replace("\n", "\\n") + "»")
    assert "\x1b[" not in plain
    dimmed = _cli(capsys, *args, "--color", "always").out
    assert dimmed.count("\x1b[2m") == 5 and dimmed.count("\x1b[0m") == 5
    assert _cli(capsys, *args, "--color", "never").out == plain


def test_cli_sampling_options(saved_model, capsys, monkeypatch):
    model, directory = saved_model
    import quietstar.cli.common

    # Loading is tested above; here the options' effect is, on the model already in memory.
    monkeypatch.setattr(quietstar.cli.common, "load_quietstar_model", lambda name, device, *a, **k: model)
    base = ["--model", directory, "--prompt", "Weng earns", "--max-new-tokens", 8]
    greedy = _cli(capsys, *base, "--greedy", "--thought-temperature", 0).out
    top1 = _cli(capsys, *base, "--sample", "--top-k", 1, "--thought-temperature", 0).out
    assert top1 == greedy  # top-1 sampling is argmax
    sampled = [_cli(capsys, *base, "--sample", "--temperature", 3, "--top-p", 0.99, "--seed", s).out
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    with pytest.raises(SystemExit):
        cli.main(["generate", *map(str, base), "--greedy", "--sample"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert cli.main(["generate", *map(str, base), "--top-k", "3"]) == 2  # needs --sample
    assert capsys.readouterr().err == ("quietstar generate: error: --temperature/--top-k/--top-p "
                                       "need --sample\n")
    for flags in (["--temperature", "0.5"], ["--greedy", "--top-p", "0.9"]):
        assert cli.main(["generate", *map(str, base), *flags]) == 2
        assert "need --sample" in capsys.readouterr().err
    # Bad values the library refuses: one line on stderr, exit 2.
    assert cli.main(["generate", *map(str, base), "--sample", "--top-p", "1.5"]) == 2
    assert capsys.readouterr().err == "quietstar generate: error: top_p must be in (0, 1], got 1.5\n"
    assert cli.main(["generate", *map(str, base), "--thought-tokens", "-1"]) == 2
    assert "thought_tokens must be an int >= 0" in capsys.readouterr().err


def test_generate_arguments_rules():
    from quietstar.cli.generate import GenerateArguments

    assert GenerateArguments("m", "p").sample is False  # greedy by default
    assert GenerateArguments("m", "p", sample=True, temperature=0.5, top_k=3).top_k == 3
    with pytest.raises(ValueError, match="need --sample"):
        GenerateArguments("m", "p", top_k=3)
    with pytest.raises(ValueError, match="thought_temperature must be a finite number >= 0 .*-1.0"):
        GenerateArguments("m", "p", thought_temperature=-1.0)


def test_streamers_print_the_continuation_and_thoughts(capsys):
    from quietstar.cli.generate import TextStreamer, ThoughtStreamer

    tok = make_model("llama").tokenizer
    ids = tok("The quick brown fox jumps", return_tensors="pt").input_ids[0]
    plain = TextStreamer(tok)
    plain.put(ids[:2][None])  # the prompt: not echoed
    for token in ids[2:]:
        plain.put(token[None])
    plain.end()
    assert capsys.readouterr().out == tok.decode(ids[2:]) + "\n"
    shown = ThoughtStreamer(tok, color=False)
    shown.put(ids[:1][None])
    shown.put_thought(ids[1:3])
    shown.put(ids[3:4])
    shown.end()
    assert capsys.readouterr().out == f"«{tok.decode(ids[1:3])}»{tok.decode(ids[3:4])}\n"


def test_cli_wraps_a_plain_base_model(saved_model, tmp_path, capsys):
    model, _ = saved_model
    model.lm.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    # With its untrained mixing head the wrapped model thinks, yet writes what the base model writes.
    result = _cli(capsys, "--model", tmp_path, "--prompt", "Natalia sold", "--max-new-tokens", 6)
    assert "base model" in result.err and "untrained" in result.err
    ids = model.tokenizer("Natalia sold", return_tensors="pt").input_ids
    expected = model.lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    assert result.out == model.tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True) + "\n"


def test_benchmark_script_runs(capsys):
    bench = load_script("benchmarks/generation.py")
    threads = torch.get_num_threads()
    try:
        bench.main(["--new-tokens", "4", "--thought-tokens", "1", "2", "--repeats", "1", "--thresholds", "1e9"])
    finally:
        torch.set_num_threads(threads)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 4  # header, rule, one row per thought length and threshold
    cells = [[c.strip().rstrip("%") for c in row.strip("|").split("|")] for row in rows[-2:]]
    for (new_tokens, k, threshold, share, base, think, target, ratio), expected_share in zip(
            [[float(c) for c in row] for row in cells], (100, 0)):
        assert (new_tokens, k, share) == (4, 2, expected_share)
        assert target == pytest.approx(0.8 * base / (1 + share / 100 * (k + 2)), rel=1e-2)
        assert ratio == pytest.approx(think / target, rel=2e-2)


# ------------------------------------------------------------------ the real model
@pytest.mark.integration
def test_smollm2_thinking_generation():
    from quietstar import QuietStarConfig, QuietStarForCausalLM
    from quietstar.models.loading import EMBEDDED_MODEL, load_base_model

    lm, tokenizer = load_base_model(EMBEDDED_MODEL)
    model = QuietStarForCausalLM.from_base(lm, tokenizer, QuietStarConfig(sampled_thought_tokens=4))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    L = ids.shape[1]
    # Untrained head, no thinking: exactly the base model's own greedy generate.
    plain = generate(model, ids, max_new_tokens=8, thought_tokens=0)
    assert torch.equal(plain, lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                          do_sample=False))
    # A live head: each step's distribution equals score_thoughts on the text so far.
    _perturb_mixing_head(model)
    out = generate(model, ids, max_new_tokens=2, return_thoughts=True, output_logits=True,
                   generator=torch.Generator().manual_seed(0))
    for s in range(2):
        text = out.sequences[:, :L + s]
        thoughts = torch.full((1, L + s, 4), 28)
        thoughts[0, -1] = out.thought_ids[0, s]
        with torch.no_grad():
            expected = model.score_thoughts(text, thoughts).mixed_logits[0, -1, 0].softmax(-1)
        assert (out.logits[s][0].softmax(-1) - expected).abs().max() < 1e-4


# ------------------------------------------------------------------ thinking where unsure
def _base_entropy(model, text):
    from quietstar.method.selection import logits_entropy

    with torch.no_grad():
        return logits_entropy(model.base_logits(text)[0, -1]).item()


def _median_entropy(model, prompt, steps):
    """The median base entropy of the steps of a generation that thinks everywhere."""
    out = generate(model, prompt, max_new_tokens=steps, thought_temperature=0, eos_token_id=[])
    return torch.tensor([_base_entropy(model, out[:, :prompt.shape[1] + s]) for s in range(steps)]).median().item()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_threshold_thinks_only_where_the_base_prediction_is_unsure(family):
    """A step thinks exactly when its base prediction's entropy exceeds the threshold: then its
    distribution is score_thoughts' after that thought, else the base model's, weight 0."""
    model = _perturb_mixing_head(make_model(family))
    prompt = random_text(1, 8, seed=1)
    steps = 8
    threshold = _median_entropy(model, prompt, steps)
    out = generate(model, prompt, max_new_tokens=steps, thought_temperature=1.0, eos_token_id=[],
                   thought_threshold=threshold, return_thoughts=True, output_logits=True,
                   generator=torch.Generator().manual_seed(0))
    taken = out.thought_taken[0].tolist()
    assert 0 < sum(taken) < steps
    pad = model.tokenizer.pad_token_id
    for s in range(steps):
        text = out.sequences[:, :8 + s]
        assert taken[s] == (_base_entropy(model, text) > threshold)
        thoughts = torch.full((1, text.shape[1], K), 5)
        thoughts[0, -1] = out.thought_ids[0, s]
        scores = model.score_thoughts(text, thoughts)
        expected = (scores.mixed_logits[0, -1, 0] if taken[s] else scores.base_logits[0, -1]).log_softmax(-1)
        got = out.logits[s][0].log_softmax(-1)
        real = torch.isfinite(expected)
        assert torch.equal(real, torch.isfinite(got))
        assert (got[real] - expected[real]).abs().max() < 1e-4
        if taken[s]:
            assert out.mixing_weight[0, s] == pytest.approx(scores.mixing_weight[0, -1, 0].item(), abs=1e-4)
        else:
            assert out.mixing_weight[0, s] == 0 and (out.thought_ids[0, s] == pad).all()
            assert out.thoughts[0][s] == ""


def test_threshold_in_a_batch_and_at_the_extremes():
    model = _perturb_mixing_head(make_model("llama"))
    prompts = [random_text(1, n, seed=i)[0] for i, n in enumerate([5, 9, 3])]
    ids, mask = _left_pad(prompts, model.tokenizer.pad_token_id)
    threshold = _median_entropy(model, prompts[1][None], 10)
    run = dict(max_new_tokens=10, thought_temperature=0, eos_token_id=[], return_thoughts=True)
    batched = generate(model, ids, mask, thought_threshold=threshold, **run)
    for i, p in enumerate(prompts):  # a row below the threshold predicts with the base, whatever the others do
        single = generate(model, p[None], thought_threshold=threshold, **run)
        assert torch.equal(batched.sequences[i, ids.shape[1]:], single.sequences[0, len(p):])
        assert torch.equal(batched.thought_taken[i], single.thought_taken[0])
        assert torch.equal(batched.thought_ids[i], single.thought_ids[0])
    assert 0 < batched.thought_taken.float().mean() < 1
    always = generate(model, ids, mask, **run)
    assert always.thought_taken.all()
    assert torch.equal(generate(model, ids, mask, thought_threshold=0.0, **run).sequences, always.sequences)
    never = generate(model, ids, mask, thought_threshold=1e9, **run)
    assert not never.thought_taken.any() and (never.mixing_weight == 0).all()
    assert torch.equal(never.sequences, generate(model, ids, mask, max_new_tokens=10, thought_tokens=0,
                                                 eos_token_id=[]))
    for bad in (-0.5, float("nan"), True):
        with pytest.raises(ValueError, match="thought_threshold must be a finite number >= 0"):
            generate(model, ids, mask, max_new_tokens=1, thought_threshold=bad)


def test_streamer_shows_only_the_thoughts_taken():
    model = _perturb_mixing_head(make_model("llama"))
    ids = random_text(1, 6, seed=7)
    threshold = _median_entropy(model, ids, 6)
    streamer = RecordingStreamer()
    out = generate(model, ids, max_new_tokens=6, thought_temperature=0, eos_token_id=[], streamer=streamer,
                   return_thoughts=True, thought_threshold=threshold)
    expected = [("put", ids.tolist())]
    for s in range(6):
        if out.thought_taken[0, s]:
            expected.append(("thought", out.thought_ids[0, s].tolist()))
        expected.append(("put", [int(out.sequences[0, 6 + s])]))
    assert streamer.events == expected + [("end",)]
    assert 0 < out.thought_taken.sum() < 6


def test_cli_thought_threshold(saved_model, capsys):
    from quietstar.cli.generate import GenerateArguments

    with pytest.raises(ValueError, match="--thought-threshold must be a finite number >= 0"):
        GenerateArguments("m", "p", thought_threshold=-1.0)
    _, directory = saved_model
    args = ["--model", directory, "--prompt", "Natalia sold", "--max-new-tokens", 4, "--show-thoughts",
            "--color", "never", "--device", "cpu"]
    assert "«" in _cli(capsys, *args).out
    assert "«" not in _cli(capsys, *args, "--thought-threshold", 1e9).out  # no token unsure enough
