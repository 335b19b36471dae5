"""quietstar.evaluation.analysis and quietstar.evaluation.plots: per-token NLLs and the difficulty report; the
`quietstar analyze` command (quietstar.cli.analyze)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread

from conftest import CORPUS, make_lm, make_model, make_tokenizer
from quietstar.cli import main as cli
from quietstar.evaluation.analysis import difficulty_report, format_difficulty_table, format_health, \
    thought_health_report, token_nlls, token_windows
from quietstar.evaluation.plots import plot_difficulty


def test_token_nlls_match_window_by_window_references():
    model = make_model()
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.6)   # thoughts change the prediction
    base_lm, tok = make_lm(), make_tokenizer()       # same weights, original tokenizer
    texts = CORPUS[:2]
    max_length = 12
    nll = token_nlls(model, texts, thought_tokens=2, thought_temperature=0.0, max_length=max_length,
                     batch_size=3)
    lengths = [len(tok(t).input_ids) for t in texts]
    assert nll.base.shape == nll.thinking.shape == nll.document.shape == (sum(n - 1 for n in lengths),)
    assert nll.document.tolist() == sum(([d] * (n - 1) for d, n in enumerate(lengths)), [])

    # Reference: each window alone, unpadded; consecutive windows share one token.
    base_ref, thinking_ref = [], []
    for text in texts:
        ids = tok(text).input_ids
        for start in range(0, len(ids) - 1, max_length - 1):
            window = torch.tensor([ids[start:start + max_length]])
            with torch.no_grad():
                # The tiny LM head has rows for the ids the meta tokens got; the wrapped model never
                # predicts them (with real models they lie beyond the head and nothing is masked).
                logits = base_lm(input_ids=window).logits[0, :-1]
                logits[:, [model.start_id, model.end_id]] = float("-inf")
                base_ref += F.cross_entropy(logits, window[0, 1:], reduction="none").tolist()
                thoughts = model.sample_thoughts(window, num_tokens=2, temperature=0.0)
                mixed = model.score_thoughts(window, thoughts).mixed_logits[0, :-1, 0]
                thinking_ref += F.cross_entropy(mixed, window[0, 1:], reduction="none").tolist()
    np.testing.assert_allclose(nll.base, base_ref, rtol=1e-4)
    np.testing.assert_allclose(nll.thinking, thinking_ref, rtol=1e-4)
    assert not np.allclose(nll.base, nll.thinking)


def test_token_nlls_of_an_untrained_model_are_equal():
    nll = token_nlls(make_model(), CORPUS[2:], thought_tokens=1, max_length=64)
    np.testing.assert_allclose(nll.thinking, nll.base, rtol=1e-5)
    plain = token_nlls(make_model(), CORPUS[2:], thought_tokens=0, max_length=64)  # the base model alone
    assert plain.thinking is plain.base and np.array_equal(plain.document, nll.document)
    np.testing.assert_allclose(plain.base, nll.base, rtol=1e-6)
    with pytest.raises(ValueError, match="thought_tokens"):
        token_nlls(make_model(), CORPUS, thought_tokens=-1)


def test_difficulty_report_hand_computed():
    base = np.arange(1.0, 11.0)                                   # token difficulties 1..10
    other = base - np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 2.0])     # thinking helps the two hardest
    perm = np.random.default_rng(0).permutation(10)               # order must not matter
    report = difficulty_report(base[perm], other[perm], buckets=5, hardest_fraction=0.2)
    assert report["n_tokens"] == 10
    assert report["mean"]["base"]["mean"] == pytest.approx(5.5)
    assert report["mean"]["other"]["mean"] == pytest.approx(5.2)
    assert report["mean"]["improvement"]["mean"] == pytest.approx(0.3)
    hardest = report["hardest"]
    assert hardest["min_base_nll"] == 9.0 and hardest["base"]["n"] == 2
    assert (hardest["base"]["mean"], hardest["other"]["mean"]) == (pytest.approx(9.5), pytest.approx(8.0))
    assert [(b["min_base_nll"], b["max_base_nll"]) for b in report["buckets"]] == [
        (1, 2), (3, 4), (5, 6), (7, 8), (9, 10)]
    assert [b["improvement"]["mean"] for b in report["buckets"]] == pytest.approx([0, 0, 0, 0, 1.5])
    assert [b["base"]["n"] for b in report["buckets"]] == [2] * 5
    zero = report["buckets"][0]["improvement"]
    assert zero["ci_low"] == zero["ci_high"] == 0.0
    table = format_difficulty_table(report)
    assert "hardest 20%" in table and "[9.00, 10.00]" in table and "+1.500" in table


def test_difficulty_report_groups_and_errors():
    rng = np.random.default_rng(1)
    base = rng.gamma(2.0, 1.0, size=400)
    other = base - 0.1 + rng.normal(0, 0.05, size=400)
    groups = np.repeat(np.arange(8), 50)
    grouped = difficulty_report(base, other, groups=groups)
    plain = difficulty_report(base, other)
    assert len(grouped["buckets"]) == 10 and all(b["base"]["n"] == 40 for b in grouped["buckets"])
    assert grouped["hardest"]["base"]["n"] == 40
    assert grouped["mean"]["improvement"]["mean"] == pytest.approx(plain["mean"]["improvement"]["mean"])
    assert grouped["mean"]["improvement"]["ci_low"] == pytest.approx(0.1, abs=0.02)
    with pytest.raises(ValueError, match="one length"):
        difficulty_report(base, other[:-1])
    with pytest.raises(ValueError, match="buckets"):
        difficulty_report(base[:5], other[:5], buckets=10)
    with pytest.raises(ValueError, match="hardest_fraction"):
        difficulty_report(base, other, hardest_fraction=0)


def test_plot_difficulty_writes_a_png(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.gamma(2.0, 1.0, size=300)
    report = difficulty_report(base, base - 0.05 * base, buckets=6)
    path = plot_difficulty(report, tmp_path / "sub" / "difficulty.png")
    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05   # not a blank canvas


def test_analyze_cli(tmp_path, capsys):
    saved = tmp_path / "model"
    make_model().save_pretrained(saved)
    data = tmp_path / "heldout.txt"
    data.write_text("\n\n".join(CORPUS) + "\n")
    out = tmp_path / "out"
    assert cli.main(["analyze", "--model", str(saved), "--data", str(data), "--limit", "3", "--out", str(out),
                     "--max-length", "32", "--buckets", "4", "--thought-tokens", "2",
                     "--batch-size", "2", "--thought-source", "random"]) == 0
    report = json.loads((out / "report.json").read_text())
    tok = make_tokenizer()
    assert report["n_tokens"] == sum(len(tok(t).input_ids) - 1 for t in CORPUS[:3])
    assert report["documents"] == 3 and len(report["buckets"]) == 4 and report["thought_tokens"] == 2
    assert report["thought_source"] == "random"
    assert (out / "difficulty.png").stat().st_size > 1000
    assert "hardest 10%" in capsys.readouterr().out
    assert report["thought_temperature"] == 1.0  # the model's, as resolved by thought_settings
    with pytest.raises(SystemExit):  # --data and --out are required
        cli.main(["analyze", "--model", str(saved), "--data", str(data)])
    assert "the following arguments are required: --out" in capsys.readouterr().err
    assert cli.main(["analyze", "--model", str(saved), "--data", str(data), "--out", str(out),
                     "--thought-tokens", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "quietstar analyze: error: --thought-tokens must be >= 1 (the analysis compares a thought with "
        "none), got 0")


def test_thought_sources_own_random_and_shifted():
    """The controls of "does the content matter?": random tokens (never a meta token) and the
    model's own thoughts moved L/2 positions on, from the same seeded generator."""
    from quietstar.evaluation.tasks import thoughts_for

    model = make_model()
    x = torch.randint(2, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)

    def make(source, seed=0):
        return thoughts_for(model, x, mask, 3, source, generator=torch.Generator().manual_seed(seed))

    own = model.sample_thoughts(x, mask, num_tokens=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(make("sampled"), own)
    assert torch.equal(make("shifted"), torch.roll(own, shifts=-5, dims=1))
    random = make("random")
    vocab = model.lm.get_output_embeddings().weight.shape[0]
    assert random.shape == (2, 10, 3) and int(random.max()) < vocab and int(random.min()) >= 0
    assert not ((random == model.start_id) | (random == model.end_id)).any()
    assert torch.equal(random, make("random")) and not torch.equal(random, make("random", seed=1))
    assert random.unique().numel() > 20  # spread over the vocabulary, not one token
    with pytest.raises(ValueError, match="thought source must be one of"):
        make("none")


def test_shifted_thoughts_at_chosen_positions_are_those_of_another_chosen_position():
    """With thought_positions (--think-at hardest, a fraction) only the chosen positions get a
    thought; the shifted control gives each one the own thought of the chosen position half the
    row's chosen positions further on (cyclically: method.controls.shifted_thoughts), never the pad
    ids of a position that did not think."""
    from quietstar.evaluation.tasks import thoughts_for

    model = make_model()
    x = torch.randint(2, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    chosen = torch.zeros_like(x, dtype=torch.bool)
    chosen[0, [1, 4, 8]] = chosen[1, [0, 2]] = True
    own = model.sample_thoughts(x, mask, num_tokens=3, temperature=0.0)  # greedy, every position
    expected = own[[0, 0, 0, 1, 1], [4, 8, 1, 2, 0]]  # 1 <- 4, 4 <- 8, 8 <- 1; 0 <- 2, 2 <- 0
    shifted = thoughts_for(model, x, mask, 3, "shifted", thought_temperature=0.0, thought_positions=chosen)
    assert not (expected == model.tokenizer.pad_token_id).all(-1).any()
    assert torch.equal(shifted[chosen], expected)


@pytest.mark.parametrize("source", ["shifted", "random"])
def test_controls_at_chosen_tokens_equal_the_controls_everywhere(source):
    """``think_at`` (the thought-content experiment's --think-at hardest) with a control: every
    token but the chosen ones gets its base NLL; the chosen ones get the NLL of random thoughts
    as when thinking everywhere (drawn alike), and shifted thoughts taken from the other chosen
    positions of their window (method.controls.shifted_thoughts, tests/test_controls.py), which
    change the prediction. One window per batch: a padded row's positions past its end have
    thoughts of their own, which differ between the two paths."""
    model = make_model()
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.6)
    texts = CORPUS[:3]
    settings = dict(thought_tokens=2, thought_temperature=0.0, max_length=24, batch_size=1,
                    thought_source=source)
    everywhere = token_nlls(model, texts, **settings)
    chosen = np.random.default_rng(0).random(everywhere.base.size) < 0.2
    some = token_nlls(model, texts, think_at=chosen, **settings)
    assert 0 < chosen.sum() < chosen.size
    np.testing.assert_allclose(some.thinking[~chosen], some.base[~chosen], rtol=1e-6)
    if source == "random":
        np.testing.assert_allclose(some.thinking[chosen], everywhere.thinking[chosen], rtol=1e-4)
    assert not np.allclose(some.thinking[chosen], some.base[chosen])


def test_short_windows_need_no_padding():
    """score_thoughts takes any length, so windows shorter than ahead_tokens + 1 are scored as
    they are: the same NLLs as each window alone."""
    model = make_model(ahead_tokens=4)
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.6)
    tok = model.tokenizer
    texts = ["Hi", "Natalia"]                 # 2 and 3 tokens < ahead_tokens + 1
    assert [len(tok(t).input_ids) for t in texts] == [2, 3]
    assert [len(w) for _, w in token_windows(texts, tok, 8)] == [2, 3]
    nll = token_nlls(model, texts, thought_tokens=2, thought_temperature=0.0, batch_size=2)
    expected = []
    for text in texts:
        ids = torch.tensor([tok(text).input_ids])
        with torch.no_grad():
            thoughts = model.sample_thoughts(ids, num_tokens=2, temperature=0.0)
            mixed = model.score_thoughts(ids, thoughts).mixed_logits[0, :-1, 0]
        expected += F.cross_entropy(mixed, ids[0, 1:], reduction="none").tolist()
    np.testing.assert_allclose(nll.thinking, expected, rtol=1e-4)
    assert nll.document.tolist() == [0, 1, 1]


@pytest.mark.parametrize("selection", ["entropy", "random"])
def test_token_nlls_at_a_fraction_think_at_the_chosen_share_only(selection):
    """A token whose position did not think keeps its base NLL; one whose position thought gets
    the all-position thinking NLL (greedy thoughts). Entropy picks the least sure predictions."""
    model = make_model()
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.6)
    texts = CORPUS[:3]
    everywhere = token_nlls(model, texts, thought_tokens=2, thought_temperature=0.0, max_length=24)
    some = token_nlls(model, texts, thought_tokens=2, thought_temperature=0.0, max_length=24,
                      thought_fraction=0.3, thought_selection=selection)
    assert everywhere.thought is None and some.thought.dtype == bool
    assert 0.25 < some.thought.mean() < 0.35
    np.testing.assert_allclose(some.base, everywhere.base, rtol=1e-5)
    np.testing.assert_allclose(some.thinking[~some.thought], some.base[~some.thought], rtol=1e-6)
    np.testing.assert_allclose(some.thinking[some.thought], everywhere.thinking[some.thought], rtol=1e-4)
    if selection == "entropy":  # per window the chosen have the highest base entropy; overall higher NLL
        assert some.base[some.thought].mean() > some.base[~some.thought].mean()
    with pytest.raises(ValueError, match=r"thought_fraction must be in \(0, 1\]"):
        token_nlls(model, texts, thought_fraction=0.0)




def test_token_nlls_at_a_fraction_choose_in_the_rollout(monkeypatch):
    """With the model's own thoughts the choice is made on the thinking rollout's text pass (no
    base_logits call), the same positions choose_thought_positions gives; a control's thoughts
    are made for positions chosen first, the same with the same seed."""
    model = make_model()
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.6)
    texts = CORPUS[:1]  # one window, one batch
    monkeypatch.setattr(model, "base_logits", lambda *a, **k: pytest.fail("a second text pass"))
    own = token_nlls(model, texts, thought_tokens=2, thought_fraction=0.3, seed=1)
    monkeypatch.undo()
    ids = torch.tensor([model.tokenizer(texts[0]).input_ids])
    chosen = model.choose_thought_positions(ids, thought_fraction=0.3)
    assert 0 < own.thought.sum() < own.thought.size and own.thought.tolist() == chosen[0, :-1].tolist()
    control = token_nlls(model, texts, thought_tokens=2, thought_fraction=0.3, seed=1, thought_source="random")
    assert np.array_equal(control.thought, own.thought) and np.array_equal(control.base, own.base)
    assert not np.allclose(control.thinking, own.thinking)

def test_token_nlls_think_at_chosen_tokens_only():
    """``think_at`` names tokens: they get the all-position thinking NLL (greedy thoughts), every
    other token its base NLL, whichever windows and batches the tokens fall in."""
    model = make_model()
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.6)
    texts = CORPUS[:3]
    everywhere = token_nlls(model, texts, thought_tokens=2, thought_temperature=0.0, max_length=24,
                            batch_size=2)
    chosen = np.random.default_rng(0).random(everywhere.base.size) < 0.2
    some = token_nlls(model, texts, thought_tokens=2, thought_temperature=0.0, max_length=24,
                      batch_size=2, think_at=chosen)
    assert 0 < chosen.sum() < chosen.size and len(set(everywhere.document)) > 1
    np.testing.assert_allclose(some.base, everywhere.base, rtol=1e-5)
    np.testing.assert_allclose(some.thinking[~chosen], some.base[~chosen], rtol=1e-6)
    np.testing.assert_allclose(some.thinking[chosen], everywhere.thinking[chosen], rtol=1e-4)
    assert not np.allclose(some.thinking[chosen], some.base[chosen])
    with pytest.raises(ValueError, match="one entry per predicted token"):
        token_nlls(model, texts, think_at=chosen[:-1])
    with pytest.raises(ValueError, match="not both"):
        token_nlls(model, texts, think_at=chosen, thought_fraction=0.5)
def test_analyze_compares_thought_fractions(tmp_path, capsys):
    saved = tmp_path / "model"
    model = make_model()
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.6)
    model.save_pretrained(saved)
    data = tmp_path / "heldout.txt"
    data.write_text("\n\n".join(CORPUS) + "\n")
    out = tmp_path / "out"
    assert cli.main(["analyze", "--model", str(saved), "--data", str(data), "--out", str(out),
                     "--max-length", "32", "--thought-tokens", "2", "--thought-temperature", "0",
                     "--thought-fractions", "1,0.25", "--buckets", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["thought_fraction"] for r in report["fractions"]] == [1.0, 0.25]
    assert report["fractions"][0]["thought_share"] == 1.0 and report["fractions"][0]["kept"] == 1.0
    assert 0.2 < report["fractions"][1]["thought_share"] < 0.3
    assert report["fractions"][0]["improvement"]["mean"] == pytest.approx(report["mean"]["improvement"]["mean"])
    printed = capsys.readouterr().out
    assert "by the share of positions that think" in printed and "25.0%" not in printed.split("kept")[0]
    assert cli.main(["analyze", "--model", str(saved), "--data", str(data), "--out", str(out),
                     "--thought-fractions", "0.5,2"]) == 2
    assert "--thought-fractions must be shares in (0, 1]" in capsys.readouterr().err


# ------------------------------------------------------------------ the thoughts' health
def _health_by_hand(model, texts, max_length, seed):
    """leak rate and distinct thoughts counted thought by thought from the model's own training
    forward on each window (one window per batch, the same generator draws)."""
    n = model.config.thoughts_per_position
    generator = torch.Generator().manual_seed(seed)
    leaks, distinct, count = 0, 0.0, 0
    model.eval()
    for _, window in token_windows(texts, model.tokenizer, max_length):
        short = max(model.config.ahead_tokens + 1 - len(window), 0)  # padded to A + 1 tokens
        ids = torch.tensor([window + [model.tokenizer.pad_token_id] * short])
        mask = torch.tensor([[1] * len(window) + [0] * short])
        with torch.no_grad():
            out = model(ids, mask, ids.masked_fill(mask == 0, -100), generator=generator, check_finite=False)
        for i in range(len(window) - 1):
            if out.thought_positions is not None and not out.thought_positions[0, i]:
                continue
            group = [tuple(t) for t in out.thought_ids[0, :, i].tolist()]
            leaks += sum(ids[0, i + 1].item() in t for t in group)
            distinct += len(set(group))
            count += n
    return leaks / count, distinct / count, count


@pytest.mark.parametrize("config", [{}, {"objective": "rpt", "thought_count": 3, "thought_selection": "random",
                                         "thought_temperature": 1.0, "ahead_tokens": 1}])
def test_thought_health_report_counts_thought_by_thought(config):
    """Leak rate and distinct thoughts as counted by hand; thought length only where thoughts may
    end early; a tiny vocabulary of thought tokens so that leaks and repeats happen."""
    model = make_model(sampled_thought_tokens=1, thoughts_per_position=3, **config)
    texts = ["a b a b a b c a b", "b a b c a b a a"]
    with torch.no_grad():  # thoughts drawn mostly from the text's few tokens: leaks and equal thoughts happen
        used = sorted({i for t in texts for i in model.tokenizer(t).input_ids})
        model.lm.get_output_embeddings().weight[used] *= 40
    report = thought_health_report(model, texts, max_length=6, batch_size=1, seed=3)
    leak, distinct, count = _health_by_hand(model, texts, 6, 3)
    assert report["thoughts"] == count
    assert report["leak_rate"] == pytest.approx(leak, abs=1e-6) and 0 < leak < 1
    assert report["distinct_thoughts"] == pytest.approx(distinct, abs=1e-6) and distinct < 1
    assert report["reward_spread"] >= 0 and "thought_length" not in report


def test_thought_health_report_lengths_of_early_ended_thoughts():
    model = make_model(objective="rlp", thought_can_end=True, sampled_thought_tokens=6, thoughts_per_position=2,
                       thought_temperature=1.0, ahead_tokens=1)
    with torch.no_grad():  # EOS likely: thoughts end early, some
        model.lm.get_output_embeddings().weight[model.tokenizer.eos_token_id] *= 40
    report = thought_health_report(model, CORPUS[:2], max_length=12, batch_size=2, seed=0)
    assert 1 <= report["thought_length"] < 6
    assert "thought length" in format_health(report)


def test_analyze_reports_thought_health(tmp_path, capsys):
    saved = tmp_path / "model"
    make_model(objective="rlp", thoughts_per_position=2, thought_temperature=0.7, ahead_tokens=1,
               thought_count=2, thought_selection="random").save_pretrained(saved)
    data = tmp_path / "heldout.txt"
    data.write_text("\n\n".join(CORPUS) + "\n")
    args = ["analyze", "--model", str(saved), "--data", str(data), "--limit", "2", "--max-length", "16",
            "--buckets", "2"]
    assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    health = json.loads((tmp_path / "a" / "report.json").read_text())["thought_health"]
    assert set(health) == {"leak_rate", "distinct_thoughts", "reward_spread", "thoughts"}
    assert health["thoughts"] > 0 and 0 <= health["leak_rate"] <= 1 and 0 < health["distinct_thoughts"] <= 1
    assert "thought health (" in capsys.readouterr().out
    assert cli.main(args + ["--out", str(tmp_path / "b"), "--no-thought-health"]) == 0
    assert "thought_health" not in json.loads((tmp_path / "b" / "report.json").read_text())
    assert "thought health" not in capsys.readouterr().out
