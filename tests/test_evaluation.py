"""quietstar.evaluation.tasks, quietstar.evaluation.answers, quietstar.evaluation.statistics, quietstar.evaluation.lm_eval_adapter and the
`quietstar eval` command (quietstar.cli.eval) on tiny models."""

from __future__ import annotations

import argparse
import json
import math
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_script, make_lm, make_model, make_tokenizer, random_text
from quietstar.cli import main as cli
from quietstar.evaluation import tasks as evaluation
from quietstar.models.loading import load_quietstar_model
from quietstar.evaluation.answers import (first_integer, first_number, majority_vote, normalize_number,
                               parse_choice, parse_gsm8k_gold)
from quietstar.evaluation.tasks import (COT_ANSWER_TRIGGER, COT_TRIGGER, Item, accuracy_predictions,
                                  answer_vocabulary, cot_predictions, direct_scores, evaluate,
                                  format_table, load_items)
from quietstar.evaluation.statistics import bootstrap_ci, format_cell

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K = FIXTURES / "gsm8k_tiny.jsonl"
CSQA = FIXTURES / "csqa_tiny.jsonl"


# ------------------------------------------------------------------------------------- answers
@pytest.mark.parametrize("gold, expected", [
    ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("It sold 1000 pens.\n#### 1,000", "1000"),
    ("#### -3", "-3"),
    ("#### 2.50", "2.5"),
])
def test_parse_gsm8k_gold(gold, expected):
    assert parse_gsm8k_gold(gold) == expected


def test_parse_gsm8k_gold_refuses_answers_without_marker():
    with pytest.raises(ValueError, match="####"):
        parse_gsm8k_gold("The answer is 72")
    with pytest.raises(ValueError, match="not a number"):
        parse_gsm8k_gold("#### seventy-two")


@pytest.mark.parametrize("text, expected", [
    ("1,000", "1000"), ("$18.00", "18"), (" 72. ", "72"), ("0.50", "0.5"), ("-4", "-4"),
    ("abc", None), ("", None), ("1e400x", None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    (" 72\nQ: What is 3 + 4?", "72"),
    ("The answer is 1,000 apples.", "1000"),
    (" $18.00 in total", "18"),
    (" -5 degrees", "-5"),
    (" 3.5 hours", "3.5"),
    (" 1,2,3", "1"),
    (" no number here", None),
])
def test_first_number(text, expected):
    assert first_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    (" 18.", "18"), (" $1,000.", "1000"), (" 3.5", "3"), (" 12, since 4 * 3 = 12", "12"),
    (" -7 degrees", "-7"), (" unknown", None),
])
def test_first_integer(text, expected):
    assert first_integer(text) == expected


def test_parse_choice_and_majority_vote():
    labels = ("A", "B", "C", "D", "E")
    assert parse_choice(" B\n", labels) == "B"
    assert parse_choice(" (C) dog", labels) == "C"
    assert parse_choice(" Because the answer is D.", labels) == "D"  # "B" inside a word is no label
    assert parse_choice(" none", labels) is None
    assert majority_vote(["3", None, "4", "4", None, None]) == "4"
    assert majority_vote(["5", "4", "4", "5"]) == "5"   # tie: the first seen wins
    assert majority_vote([None, None]) is None


# ------------------------------------------------------------------------------------- data
def test_load_items_from_local_files(tmp_path):
    gsm = load_items("gsm8k", str(GSM8K))
    assert [i.answer for i in gsm] == ["72", "10", "1000"]
    assert gsm[0].prompt.startswith("Q: Natalia sold clips") and gsm[0].prompt.endswith("?\nA:")
    csqa = load_items("csqa", str(CSQA), limit=2)
    assert len(csqa) == 2 and csqa[1].id == "q2" and csqa[1].answer == "B"
    assert csqa[0].labels == ("A", "B", "C", "D", "E")
    assert csqa[0].prompt == ("Q: Where would you put a clip you sold?\n"
                              "(A) bag (B) May (C) friends (D) April (E) shop\nA:")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer"}\n')
    with pytest.raises(ValueError, match="'answer'"):
        load_items("gsm8k", str(bad))
    bad.write_text('{"question": "q", "choices": {"label": ["A"], "text": ["x"]}, "answerKey": "Z"}\n')
    with pytest.raises(ValueError, match="answerKey 'Z'"):
        load_items("csqa", str(bad))
    with pytest.raises(FileNotFoundError):
        load_items("gsm8k", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown task"):
        load_items("mmlu", str(GSM8K))


def test_load_items_from_the_hub_copy(monkeypatch):
    import datasets

    records = [json.loads(line) for line in CSQA.read_text().splitlines()]
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "openai/gsm8k":
            raise ConnectionError("offline")
        return records

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    items = load_items("csqa", limit=2)
    assert [i.id for i in items] == ["q1", "q2"] and calls == [("tau/commonsense_qa", None, "validation")]
    with pytest.raises(ValueError, match="--data FILE.jsonl"):
        load_items("gsm8k")
    assert calls[-1] == ("openai/gsm8k", "main", "test")


# ------------------------------------------------------------------------------------- direct score
def test_answer_vocabulary_comes_from_the_tokenizer():
    tok = make_tokenizer()
    gsm = answer_vocabulary(tok, "gsm8k", vocab_size=336)
    assert gsm.shape == (336,)
    pieces = {tok.decode([i]) for i in gsm.nonzero().flatten().tolist()}
    # Digit tokens, with or without the glued space; the superscript digits of the vocabulary are not
    # ASCII digits and stay out.
    assert pieces == {*"0123456789", "12", "48", "72", " 48", " 72", "\n"}
    # A negative or decimal gold answer brings its own signs; an integer one keeps the paper's vocabulary.
    def signs(answer):
        vocab = answer_vocabulary(tok, "gsm8k", vocab_size=336, answer=answer)
        return {tok.decode([i]) for i in vocab.nonzero().flatten().tolist()} - pieces

    assert signs("72") == set() and signs("-3") == {"-"} and signs("0.25") == {"."} and signs("-2.5") == {"-", "."}
    csqa = answer_vocabulary(tok, "csqa", ("A", "B", "C", "D", "E"), 336)
    assert {tok.decode([i]) for i in csqa.nonzero().flatten().tolist()} == {*"ABCDE", "\n"}


def _controlled_logits(model, tables: dict[int, dict[str, float]]):
    """Replaces model.logits: every position gets the same logits, 0 except the tokens named in the
    table for that hidden-state rank (3: text pass / thoughts off, 4: post-thought and mixed)."""
    V = model.lm.get_output_embeddings().weight.shape[0]
    rows = {}
    for rank, table in tables.items():
        row = torch.zeros(V)
        for token, value in table.items():
            row[model.tokenizer.convert_tokens_to_ids(token)] = value
        row[[model.start_id, model.end_id]] = float("-inf")
        rows[rank] = row
    model.logits = lambda hidden: rows[hidden.dim()].expand(*hidden.shape[:-1], V)


def test_direct_score_hand_computed_gsm8k():
    model = make_model()
    items = load_items("gsm8k", str(GSM8K))
    # The answer vocabulary has 16 tokens. Thoughts off: "Ġ72" has logit log 4, "1" log 2, the 14
    # others 0, so Z = 4 + 2 + 14 = 20. Thoughts on (mixed logits): "Ġ72" log 9, "0" log 3, Z = 26.
    _controlled_logits(model, {3: {"Ġ72": math.log(4), "1": math.log(2)},
                               4: {"Ġ72": math.log(9), "0": math.log(3)}})
    tok = model.tokenizer
    assert tok.convert_ids_to_tokens(tok("A: 72\n").input_ids)[-2:] == ["Ġ72", "Ċ"]
    assert tok.convert_ids_to_tokens(tok("A: 1000\n").input_ids)[-5:] == ["1", "0", "0", "0", "Ċ"]
    off = direct_scores(model, items, "gsm8k", thought_tokens=0, batch_size=2)
    # "72": p(Ġ72) p(\n); "10": p(1) p(0) p(\n); "1000": p(1) p(0)^3 p(\n)
    np.testing.assert_allclose(off, [4 / 20 * 1 / 20, 2 / 20 * (1 / 20) ** 2, 2 / 20 * (1 / 20) ** 4],
                               rtol=1e-5)
    on = direct_scores(model, items, "gsm8k", thought_tokens=2, thought_temperature=0.0, batch_size=3)
    np.testing.assert_allclose(on, [9 / 26 * 1 / 26, 1 / 26 * 3 / 26 * 1 / 26,
                                    1 / 26 * (3 / 26) ** 3 * 1 / 26], rtol=1e-5)
    # A negative or decimal answer adds its minus sign or decimal point to its own vocabulary (17
    # tokens: Z = 4 + 2 + 15 = 21): "-10" is "-", "1", "0", "\n"; "2.5" is "2", ".", "5", "\n".
    negative, decimal = Item("n", "How cold is it?", "-10"), Item("d", "How far?", "2.5")
    assert tok.convert_ids_to_tokens(tok(f"{negative.prompt} -10\n").input_ids)[-5:] == ["Ġ", "-", "1", "0", "Ċ"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = direct_scores(model, [items[1], negative, decimal], "gsm8k")
    np.testing.assert_allclose(scores, [off[1], 2 / 21 ** 4, 1 / 21 ** 4], rtol=1e-5)  # the integer's unchanged
    # Anything else outside the answer vocabulary scores 0, with a warning.
    with pytest.warns(UserWarning, match="1 answer"):
        assert direct_scores(model, [Item("p", "How much?", "7%")], "gsm8k")[0] == 0.0


def test_direct_score_hand_computed_csqa_through_evaluate():
    model = make_model()
    items = load_items("csqa", str(CSQA))
    # Vocabulary A..E and newline. Off: "A" has logit log 3 (Z = 8); on: "C" has logit log 5 (Z = 10).
    _controlled_logits(model, {3: {"A": math.log(3)}, 4: {"C": math.log(5)}})
    result = evaluate(model, "csqa", items, ["direct"], thought_tokens=2, thought_temperature=0.0,
                      batch_size=2, progress=False)
    off_items = [3 / 64, 1 / 64, 1 / 64]       # answers A, B, C; each times p(\n) = 1/8
    on_items = [1 / 100, 1 / 100, 5 / 100]
    np.testing.assert_allclose([r["direct_off"] for r in result["items"]], off_items, rtol=1e-5)
    np.testing.assert_allclose([r["direct_on"] for r in result["items"]], on_items, rtol=1e-5)
    direct = result["metrics"]["direct"]
    assert direct["off"]["n"] == direct["on"]["n"] == 3
    assert direct["off"]["mean"] == pytest.approx(5 / 192, rel=1e-5)
    assert direct["on"]["mean"] == pytest.approx(7 / 300, rel=1e-5)
    assert direct["difference"]["mean"] == pytest.approx(7 / 300 - 5 / 192, rel=1e-4)
    assert direct["off"]["ci_low"] <= direct["off"]["mean"] <= direct["off"]["ci_high"]
    table = format_table(result)
    assert "direct" in table and "0.026" in table and "3 items" in table


def _reference_direct_score(lm, tokenizer, item: Item, digits: bool) -> float:
    """The paper's score computed on the plain model, one item at a time, written out directly."""
    text = f"{item.prompt} {item.answer}\n"
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0]
    allowed = []
    for i in range(len(tokenizer)):
        s = tokenizer.decode([i])
        s = s[1:] if s.startswith(" ") else s
        ok = s.isascii() and s.isdigit() if digits else s in item.labels
        allowed.append(i not in tokenizer.all_special_ids and (s == "\n" or (s != "" and ok)))
    allowed = torch.tensor(allowed + [False] * (logits.shape[-1] - len(allowed)))
    score = 1.0
    for j, (_, end) in enumerate(enc.offset_mapping):
        if end > len(item.prompt) + 1:   # an answer token (or the final newline)
            probs = logits[j - 1].masked_fill(~allowed, float("-inf")).softmax(-1)
            score *= probs[ids[0, j]].item()
    return score


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_direct_score_without_thoughts_equals_the_plain_base_model(family):
    items = load_items("gsm8k", str(GSM8K)) + load_items("csqa", str(CSQA))
    model = make_model(family)
    base_lm, base_tok = make_lm(family), make_tokenizer()   # the same weights, original tokenizer
    for task, subset in (("gsm8k", items[:3]), ("csqa", items[3:])):
        ours = direct_scores(model, subset, task, thought_tokens=0, batch_size=2)
        reference = [_reference_direct_score(base_lm, base_tok, item, task == "gsm8k") for item in subset]
        np.testing.assert_allclose(ours, reference, rtol=1e-4)
    # An untrained model mixes with weight 0: thinking changes nothing.
    gsm = items[:3]
    np.testing.assert_allclose(direct_scores(model, gsm, "gsm8k", thought_tokens=2),
                               direct_scores(model, gsm, "gsm8k", thought_tokens=0), rtol=1e-4)


def test_direct_score_with_thoughts_matches_score_thoughts_item_by_item():
    model = make_model()
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.7)   # the thoughts now change the prediction
    items = load_items("gsm8k", str(GSM8K))
    batched = direct_scores(model, items, "gsm8k", thought_tokens=2, thought_temperature=0.0, batch_size=3)
    tok = model.tokenizer
    vocab = answer_vocabulary(tok, "gsm8k", vocab_size=336)
    for item, score in zip(items, batched):
        text = f"{item.prompt} {item.answer}\n"
        enc = tok(text, return_offsets_mapping=True)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            thoughts = model.sample_thoughts(ids, num_tokens=2, temperature=0.0)
            mixed = model.score_thoughts(ids, thoughts).mixed_logits[0, :, 0]
        expected = 1.0
        for j, (_, end) in enumerate(enc.offset_mapping):
            if end > len(item.prompt) + 1:
                expected *= mixed[j - 1].masked_fill(~vocab, float("-inf")).softmax(-1)[ids[0, j]].item()
        assert score == pytest.approx(expected, rel=1e-4)
    assert not np.allclose(batched, direct_scores(model, items, "gsm8k", thought_tokens=0))


def test_next_token_logits_without_thoughts_is_one_base_logits_call(monkeypatch):
    from quietstar.evaluation.tasks import next_token_logits

    model = make_model()
    x = random_text(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    reference = model.base_logits(x, mask)
    calls = []
    monkeypatch.setattr(model, "base_logits", lambda *args: calls.append(args) or reference)
    monkeypatch.setattr(model, "score_thoughts", None)  # never reached
    base, predicted = next_token_logits(model, x, mask, 0)
    assert len(calls) == 1 and base is predicted is reference
    with pytest.raises(ValueError, match="thought_tokens must be an int >= 0"):
        next_token_logits(model, x, mask, -1)


# ------------------------------------------------------------------------------------- generation metrics
class FakeGenerate:
    """Stands in for model.generate: answers each prompt with a scripted continuation."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        self.calls.append(kwargs)
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([i for i, m in zip(ids, mask) if m])
            rows.append(ids + self.tokenizer(self.script(prompt, kwargs)).input_ids)
        width = max(map(len, rows))
        return torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


def test_accuracy_exact_match_hand_computed():
    model = make_model()
    items = load_items("gsm8k", str(GSM8K))
    answers = {  # (question prefix, thoughts on?) -> greedy continuation
        ("Natalia", False): " 72\nQ: next", ("Natalia", True): " 72 clips",
        ("Weng", False): " 10 dollars", ("Weng", True): " 12",
        ("A shop", False): " 999", ("A shop", True): " 1,000.",
    }
    fake = FakeGenerate(model.tokenizer, lambda prompt, kw: answers[
        (next(q for q, _ in answers if prompt.startswith(f"Q: {q}")), kw["thought_tokens"] > 0)])
    model.generate = fake
    result = evaluate(model, "gsm8k", items, ["accuracy"], thought_tokens=3, batch_size=2, progress=False)
    assert [r["accuracy_off"] for r in result["items"]] == ["72", "10", "999"]
    assert [r["accuracy_on"] for r in result["items"]] == ["72", "12", "1000"]
    acc = result["metrics"]["accuracy"]
    assert acc["off"]["mean"] == pytest.approx(2 / 3) and acc["on"]["mean"] == pytest.approx(2 / 3)
    assert acc["difference"]["mean"] == pytest.approx(0.0)
    assert {c["thought_tokens"] for c in fake.calls} == {0, 3}
    assert all(c["do_sample"] is False for c in fake.calls)

    csqa = load_items("csqa", str(CSQA))
    model.generate = FakeGenerate(model.tokenizer, lambda p, kw: {"W": " (A) bag", "Wh": " B", "Wh2": ""}
                                  ["W" if "clip you" in p else "Wh" if "fox" in p else "Wh2"])
    predictions = accuracy_predictions(model, csqa, "csqa", thought_tokens=0, batch_size=3)
    assert predictions == ["A", "B", None]


def test_cot_majority_vote_hand_computed():
    model = make_model()
    items = load_items("gsm8k", str(GSM8K))[:2]
    reasoning = {"Natalia": [" 48 / 2 = 24, 48 + 24 = 72.\nQ: unrelated", " 48 + 48 = 96.", " 24 + 48 = 72."],
                 "Weng": [" 12 / 60 * 50.", " she earns 10.", " it is 9."]}
    final = {" 48 / 2 = 24, 48 + 24 = 72.": " 72.", " 48 + 48 = 96.": " 96", " 24 + 48 = 72.": " $72",
             " 12 / 60 * 50.": " 10", " she earns 10.": " unclear", " it is 9.": " 9 dollars"}
    seen: dict[str, int] = {}
    answer_prompts = []

    def script(prompt, kw):
        if prompt.endswith(COT_TRIGGER):
            assert kw["do_sample"] and kw["temperature"] == 0.5 and kw["max_new_tokens"] == 20
            name = "Natalia" if "Natalia" in prompt else "Weng"
            seen[name] = seen.get(name, 0) + 1
            return reasoning[name][(seen[name] - 1) % 3]
        assert prompt.endswith(COT_ANSWER_TRIGGER) and kw["do_sample"] is False
        answer_prompts.append(prompt)
        body = prompt.split(COT_TRIGGER, 1)[1][:-len(COT_ANSWER_TRIGGER)]
        return final[body]

    model.generate = FakeGenerate(model.tokenizer, script)
    results = cot_predictions(model, items, thought_tokens=0, samples=3, temperature=0.5,
                              max_reasoning_tokens=20, batch_size=6)
    assert results == [("72", ["72", "96", "72"]), ("10", ["10", None, "9"])]
    # The reasoning was cut where the model started a new question.
    assert answer_prompts[0] == items[0].prompt + COT_TRIGGER + " 48 / 2 = 24, 48 + 24 = 72." + COT_ANSWER_TRIGGER

    seen.clear()
    result = evaluate(model, "gsm8k", items, ["cot"], thought_tokens=2, cot_samples=3,
                      cot_temperature=0.5, cot_max_tokens=20, batch_size=3, progress=False)
    assert result["metrics"]["cot"]["off"]["mean"] == 1.0
    assert result["items"][1]["cot_on"] == {"answer": "10", "votes": ["10", None, "9"]}
    with pytest.raises(ValueError, match="GSM8K only"):
        evaluate(model, "csqa", load_items("csqa", str(CSQA)), ["cot"])


def test_greedy_accuracy_with_real_generation_is_batch_invariant(monkeypatch):
    """Left-padded batches generate what each prompt generates alone. Compared on the whole
    completions (the parsed answers of a random model are mostly alike or None, which would
    hide a difference), and the completions must differ between items."""
    model = make_model()
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.5)
    monkeypatch.setattr(evaluation, "parse_answer", lambda task, item, completion: completion)
    items = load_items("gsm8k", str(GSM8K))
    assert len({len(model.tokenizer(item.prompt).input_ids) for item in items}) > 1  # padding happens
    for k in (0, 2):
        batched = accuracy_predictions(model, items, "gsm8k", thought_tokens=k, thought_temperature=0.0,
                                       batch_size=3)
        single = [accuracy_predictions(model, [item], "gsm8k", thought_tokens=k, thought_temperature=0.0,
                                       batch_size=1)[0] for item in items]
        assert batched == single
        assert len(set(single)) > 1 and all(single)


# ------------------------------------------------------------------------------------- statistics
def test_bootstrap_ci():
    assert bootstrap_ci([0.3] * 20) == (pytest.approx(0.3), pytest.approx(0.3))
    rng = np.random.default_rng(1)
    values = rng.normal(2.0, 1.0, size=2000)
    low, high = bootstrap_ci(values, seed=3)
    half = 1.96 * values.std() / math.sqrt(values.size)   # the normal-theory interval
    assert low == pytest.approx(values.mean() - half, abs=0.02)
    assert high == pytest.approx(values.mean() + half, abs=0.02)
    # Groups of identical values: resampling groups is resampling the group values.
    group_values = rng.normal(size=30)
    grouped = bootstrap_ci(np.repeat(group_values, 10), groups=np.repeat(np.arange(30), 10), seed=4)
    assert grouped == pytest.approx(bootstrap_ci(group_values, seed=4))
    token_level = bootstrap_ci(np.repeat(group_values, 10), seed=4)
    assert token_level[1] - token_level[0] < grouped[1] - grouped[0]
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_format_cell():
    summary = {"mean": 0.5, "ci_low": 0.25, "ci_high": 0.75, "n": 4}
    assert format_cell(summary) == "0.500 [0.250, 0.750]"
    assert format_cell({**summary, "ci_low": -0.25}, signed=True) == "+0.500 [-0.250, +0.750]"


# ------------------------------------------------------------------------------------- CLI
def run_command(argv: list[str]) -> int:
    """Runs `quietstar eval` with these flags."""
    return cli.main(["eval", *argv])


def test_eval_cli_on_saved_and_plain_models(tmp_path, capsys):
    saved = tmp_path / "saved"
    make_model().save_pretrained(saved)
    out = tmp_path / "results.json"
    code = run_command(["--model", str(saved), "--task", "csqa", "--data", str(CSQA), "--limit", "2",
                     "--metrics", "direct", "--thought-tokens", "2", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["n_items"] == 2 and results["thought_tokens"] == 2 and results["model"] == str(saved)
    assert results["metrics"]["direct"]["on"]["n"] == 2
    captured = capsys.readouterr()
    assert "thoughts off" in captured.out and "note:" not in captured.err

    plain = tmp_path / "plain"
    make_lm().save_pretrained(plain)
    make_tokenizer().save_pretrained(plain)
    assert run_command(["--model", str(plain), "--task", "gsm8k", "--data", str(GSM8K), "--limit", "1",
                     "--thought-tokens", "1"]) == 0
    assert "wrapped fresh" in capsys.readouterr().err


def test_eval_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    saved = tmp_path / "saved"
    make_model().save_pretrained(saved)
    base = ["--model", str(saved), "--task", "gsm8k", "--data", str(GSM8K), "--limit", "1"]
    capsys.readouterr()
    for flags, message in [
        (["--metrics", "direct,bleu"], "--metrics: unknown metric(s) ['bleu']; choose from direct,accuracy,cot"),
        (["--lm-eval-include", str(tmp_path)], "--lm-eval-include adds lm-eval tasks: it needs --lm-eval TASK"),
        (["--thought-tokens", "0"], "thought_tokens must be >= 1 (thoughts off is always measured too)"),
        (["--data", str(tmp_path / "missing.jsonl")], "does not exist"),
    ]:
        assert run_command(base + flags) == 2
        last = capsys.readouterr().err.splitlines()[-1]  # after the weights' loading bar, if any
        assert last.startswith("quietstar eval: error: ") and message in last
    with pytest.raises(SystemExit):
        run_command(base + ["--task", "mmlu"])
    assert "invalid choice: 'mmlu'" in capsys.readouterr().err


def test_eval_arguments_parse_comma_separated_lists():
    from quietstar.utils.settings import add_dataclass_arguments, parse_dataclass
    from quietstar.cli.eval import EvalArguments
    from quietstar.evaluation.tasks import TASKS

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, EvalArguments)
    settings = parse_dataclass(EvalArguments, parser.parse_args(
        ["--metrics", "direct, accuracy,", "--lm-eval", "arc_easy,hellaswag"]))
    assert settings.metrics == ("direct", "accuracy") and settings.lm_eval == ("arc_easy", "hellaswag")
    assert EvalArguments().metrics == ("direct",) and EvalArguments().lm_eval is None
    assert typing.get_args(typing.get_type_hints(EvalArguments)["task"]) == TASKS


def test_load_model_dtype(tmp_path):
    saved = tmp_path / "saved"
    make_model().save_pretrained(saved)
    model = load_quietstar_model(str(saved), device="cpu", dtype="bfloat16")
    assert model.lm.dtype == torch.bfloat16 and not model.training
    items = load_items("gsm8k", str(GSM8K))
    reference = direct_scores(load_quietstar_model(str(saved)), items, "gsm8k", thought_tokens=2)
    np.testing.assert_allclose(direct_scores(model, items, "gsm8k", thought_tokens=2), reference, rtol=0.2)


# ------------------------------------------------------------------------------------- lm-eval
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
"""
MC_YAML = TASK_YAML + """output_type: multiple_choice
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN_YAML = TASK_YAML + """output_type: generate_until
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""

ROLLING_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "Q: {{{{question}}}} A: {{{{answer}}}}"
metric_list:
  - metric: word_perplexity
"""


@pytest.fixture
def lm_eval_tasks(tmp_path):
    pytest.importorskip("lm_eval")
    data = FIXTURES / "lm_eval_tiny.jsonl"
    (tmp_path / "tiny_mc.yaml").write_text(MC_YAML.format(name="tiny_mc", data=data))
    (tmp_path / "tiny_gen.yaml").write_text(GEN_YAML.format(name="tiny_gen", data=data))
    (tmp_path / "tiny_rolling.yaml").write_text(ROLLING_YAML.format(name="tiny_rolling", data=data))
    return tmp_path


def test_lm_eval_without_thoughts_equals_hflm_request_by_request(lm_eval_tasks):
    """Thoughts off, every request of every kind (log-likelihood with its greedy flag, rolling
    log-likelihood, greedy generation) gets HFLM's own answer on the same weights. The meta
    tokens lie beyond the LM head here, as in real models, so both normalise over one vocabulary."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from conftest import TOKENIZER_SIZE
    from quietstar.evaluation.lm_eval_adapter import QuietStarLM

    tasks = ["tiny_mc", "tiny_rolling", "tiny_gen"]

    def samples(lm):
        out = simple_evaluate(model=lm, tasks=tasks, bootstrap_iters=0, log_samples=True,
                              task_manager=TaskManager(include_path=str(lm_eval_tasks)))
        return {task: sorted(out["samples"][task], key=lambda s: s["doc_id"]) for task in tasks}

    ours = samples(QuietStarLM(make_model(vocab_size=TOKENIZER_SIZE), thought_tokens=0, batch_size=3))
    plain = samples(HFLM(pretrained=make_lm(vocab_size=TOKENIZER_SIZE), tokenizer=make_tokenizer(),
                         batch_size=2, device="cpu"))
    for task in tasks:
        assert len(ours[task]) == len(plain[task]) == 4
        for a, b in zip(ours[task], plain[task]):
            assert a["doc_id"] == b["doc_id"]
            assert len(a["resps"]) == len(b["resps"]) >= 1
            for (ra,), (rb,) in zip(a["resps"], b["resps"]):
                if task == "tiny_mc":  # (log-likelihood, is the continuation greedy)
                    assert ra[0] == pytest.approx(rb[0], abs=1e-4) and ra[1] == rb[1], (task, a["doc_id"])
                elif task == "tiny_rolling":
                    assert ra == pytest.approx(rb, abs=1e-4), (task, a["doc_id"])
                else:
                    assert ra == rb, (task, a["doc_id"])


def test_lm_eval_model_call_takes_any_length():
    """No padding to ahead_tokens + 1: inputs of 1 and 2 tokens are scored as they are."""
    pytest.importorskip("lm_eval")
    from quietstar.evaluation.tasks import next_token_logits
    from quietstar.evaluation.lm_eval_adapter import QuietStarLM

    model = make_model(ahead_tokens=4)
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.6)
    for k in (0, 2):
        lm = QuietStarLM(model, thought_tokens=k, thought_temperature=0.0, batch_size=2)
        assert (lm.thought_tokens, lm.thought_temperature) == (k, 0.0)
        for L in (1, 2):
            x = random_text(2, L, seed=L)
            with torch.no_grad():
                logits = lm._model_call(x)
                _, expected = next_token_logits(model, x, torch.ones_like(x), k, 0.0)
            assert logits.shape == (2, L, model.lm.get_output_embeddings().weight.shape[0])
            assert torch.equal(logits, expected)
    with pytest.raises(ValueError, match="thought_tokens must be an int >= 0"):
        QuietStarLM(model, thought_tokens=-1)


def test_lm_eval_loglikelihood_and_generation_think(lm_eval_tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from quietstar.evaluation.lm_eval_adapter import QuietStarLM

    model = make_model()
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.6)
    lm = QuietStarLM(model, thought_tokens=2, thought_temperature=0.0, batch_size=2)
    out = simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_gen"], bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(lm_eval_tasks)))
    tok = model.tokenizer
    for sample in out["samples"]["tiny_mc"]:
        context = f"Q: {sample['doc']['question']}\nA:"
        for choice, (loglik, _) in zip(sample["doc"]["choices"], sample["filtered_resps"]):
            # lm-eval scores " choice" after the context, tokenized apart.
            # lm-eval tokenizes context + " " + choice whole; the continuation is what follows
            # the context's own tokens.
            ctx = tok(context).input_ids
            whole = tok(f"{context} {choice}").input_ids
            assert whole[:len(ctx)] == ctx
            cont = whole[len(ctx):]
            ids = torch.tensor([whole])
            with torch.no_grad():
                thoughts = model.sample_thoughts(ids, num_tokens=2, temperature=0.0)
                mixed = model.score_thoughts(ids, thoughts).mixed_logits[0, :, 0].log_softmax(-1)
            expected = sum(mixed[len(ctx) + j - 1, t].item() for j, t in enumerate(cont))
            assert loglik == pytest.approx(expected, abs=1e-3)
    for sample in out["samples"]["tiny_gen"]:
        prompt = torch.tensor([tok(f"Q: {sample['doc']['question']}\nA:").input_ids])
        generated = model.generate(prompt, max_new_tokens=6, thought_tokens=2, thought_temperature=0.0)
        text = tok.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True).split("\n")[0]
        assert sample["filtered_resps"][0] == text


def test_lm_eval_without_thoughts_equals_hflm_and_cli(lm_eval_tasks, tmp_path, capsys):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from quietstar.evaluation.lm_eval_adapter import evaluate_lm_eval, format_lm_eval_table

    model = make_model()
    results = evaluate_lm_eval(model, ["tiny_mc"], thought_tokens=2, include_path=str(lm_eval_tasks))
    acc = results["metrics"]["tiny_mc/acc,none"]
    assert acc["off"]["n"] == 4
    # An untrained model mixes with weight 0: thoughts on equals off.
    assert acc["difference"]["mean"] == 0.0
    plain = simple_evaluate(model=HFLM(pretrained=make_lm(), tokenizer=make_tokenizer(), batch_size=2,
                                       device="cpu"),
                            tasks=["tiny_mc"], bootstrap_iters=0,
                            task_manager=TaskManager(include_path=str(lm_eval_tasks)))
    assert acc["off"]["mean"] == pytest.approx(plain["results"]["tiny_mc"]["acc,none"])
    assert "tiny_mc/acc,none" in format_lm_eval_table(results)

    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    out = tmp_path / "lm_eval.json"
    assert run_command(["--model", str(saved), "--lm-eval", "tiny_gen", "--lm-eval-include",
                     str(lm_eval_tasks), "--thought-tokens", "1", "--limit", "2", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["metrics"]["tiny_gen/exact_match,none"]["on"]["n"] == 2
    assert "lm-eval tiny_gen" in capsys.readouterr().out


def test_direct_score_thinks_only_at_the_positions_it_scores(monkeypatch):
    model = make_model()
    items = load_items("gsm8k", str(GSM8K))
    seen = []
    think = model.think
    monkeypatch.setattr(model, "think", lambda ids, mask, k, t, g, thought_positions, steps: seen.append(
        thought_positions) or think(ids, mask, k, t, g, thought_positions, steps))
    direct_scores(model, items, "gsm8k", thought_tokens=2, batch_size=len(items))
    (positions,) = seen
    for b, item in enumerate(items):
        tokens, first = evaluation.answer_token_span(model.tokenizer, item.prompt, item.answer)
        assert positions[b].nonzero().flatten().tolist() == list(range(first - 1, len(tokens) - 1))


def test_lm_eval_loglikelihood_thinks_only_where_lm_eval_reads(lm_eval_tasks, monkeypatch):
    """Each model input thinks at the positions that predict its continuation; the numbers are
    those of thinking everywhere (test_lm_eval_loglikelihood_and_generation_think)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from quietstar.evaluation.lm_eval_adapter import QuietStarLM

    model = make_model()
    lm = QuietStarLM(model, thought_tokens=2, thought_temperature=0.0, batch_size=2)
    seen = []
    think = model.think
    monkeypatch.setattr(model, "think", lambda ids, mask, k, t, g, thought_positions, steps: seen.append(
        (ids, thought_positions)) or think(ids, mask, k, t, g, thought_positions, steps))
    out = simple_evaluate(model=lm, tasks=["tiny_mc"], bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(lm_eval_tasks)))
    tok = model.tokenizer
    expected = set()
    for sample in out["samples"]["tiny_mc"]:
        context = tok(f"Q: {sample['doc']['question']}\nA:").input_ids
        for choice in sample["doc"]["choices"]:
            whole = tok(f"Q: {sample['doc']['question']}\nA: {choice}").input_ids
            expected.add((tuple(whole[:-1]), len(context) - 1, len(whole) - 1))
    got = set()
    for ids, positions in seen:
        for row, chosen in zip(ids.tolist(), positions):
            where = chosen.nonzero().flatten().tolist()
            end = where[-1] + 1
            got.add((tuple(row[:end]), where[0], end))
            assert where == list(range(where[0], end))
    assert got == expected
    assert not lm._scored  # forgotten after the requests


def test_lm_eval_scored_positions_think_everywhere_when_unsure():
    pytest.importorskip("lm_eval")
    from quietstar.evaluation.lm_eval_adapter import QuietStarLM

    lm = QuietStarLM(make_model(), thought_tokens=1)
    lm._scored = {(5, 6, 7): 2, (5, 6, 7, 0): 1, (9,): 1}
    rows = torch.tensor([[5, 6, 7, 0, 0], [9, 0, 0, 0, 0], [4, 4, 0, 0, 0]])
    assert lm._scored_positions(rows).tolist() == [[True] * 5, [True, False, False, False, False],
                                                   [True] * 5]


def test_evaluation_benchmark_script_runs(tiny_model_dir, capsys):
    bench = load_script("benchmarks/evaluation.py")
    threads = torch.get_num_threads()
    try:
        bench.main(["--model", str(tiny_model_dir), "--data", str(GSM8K), "--limit", "3", "--thought-tokens", "2"])
    finally:
        torch.set_num_threads(threads)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["thoughts", "off", "k = 2"]
    off, on = (float(r.split("|")[2]) for r in rows[1:])
    # the ratio is of the unrounded times: within the printed values' rounding (0.0005 s, 0.005)
    ratio, r = float(rows[2].split("|")[3]), 0.0005
    assert (on - r) / (off + r) - 0.005 <= ratio <= (on + r) / max(off - r, 1e-9) + 0.005 and on > 0
