"""quietstar.evaluation.viewer: thoughts, their gains, and the HTML page (checked in headless Chromium); the
`quietstar inspect` command (quietstar.cli.inspect_thoughts)."""

from __future__ import annotations

import copy
import math
import re
import shutil
import subprocess

import pytest
import torch
from matplotlib.image import imread

from conftest import CORPUS, make_lm, make_model, make_tokenizer
from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.cli import main as cli
from quietstar.evaluation.viewer import TokenThought, render_html, token_thoughts, write_page

TEXT = CORPUS[1]


def test_gains_hand_computed():
    model = make_model(ahead_tokens=3)
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.3)
    V = model.lm.get_output_embeddings().weight.shape[0]            # 336, meta ids 320 and 321
    meta = [model.start_id, model.end_id]
    base = torch.zeros(V).index_fill(0, torch.tensor(meta), float("-inf"))
    mixed = base.clone()
    mixed[0::2] += math.log(2)                                        # even ids twice as likely
    model.logits = lambda h: (base if h.dim() == 3 else mixed).expand(*h.shape[:-1], V)
    # Without the thought every one of the 334 ordinary tokens has p = 1/334; with it an even token has
    # 2/Z and an odd one 1/Z, Z = 2 * 167 + 167 = 501. The gain of one step is log(334 * c / 501):
    # log(4/3) for an even next token, log(2/3) for an odd one.
    step = {0: math.log(4 / 3), 1: math.log(2 / 3)}
    records = token_thoughts(model, TEXT, thought_tokens=2, seed=1)
    ids = model.tokenizer(TEXT).input_ids
    assert [r.token for r in records] == [model.tokenizer.decode([i]) for i in ids]
    for i, r in enumerate(records):
        following = ids[i + 1:i + 4]
        assert r.steps == len(following)
        if following:
            assert r.gain == pytest.approx(sum(step[t % 2] for t in following), abs=1e-4)
        else:
            assert math.isnan(r.gain)
        assert r.weight == pytest.approx(0.3)
        assert len(model.tokenizer(r.thought, add_special_tokens=False).input_ids) >= 1


def test_gains_equal_the_plain_model_run_position_by_position():
    """Every token's greedy thought and gain from an untouched copy of the LM (eager attention),
    run on x_0..x_i START thought END x_{i+1}..x_{i+s} for each position and step, mixed by the
    model's own head: an off-by-one in positions or steps changes these numbers."""
    lm = make_lm("llama")
    reference = copy.deepcopy(lm).get_decoder()
    model = QuietStarForCausalLM.from_base(lm, make_tokenizer(), QuietStarConfig(
        sampled_thought_tokens=2, ahead_tokens=3))
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        model.mixing_head.mlp[-1].bias.fill_(0.3)
    records = token_thoughts(model, TEXT, thought_tokens=2, thought_temperature=0.0)
    x = model.tokenizer(TEXT, return_tensors="pt").input_ids[0]
    emb = model.get_input_embeddings()
    start, end = torch.tensor([model.start_id]), torch.tensor([model.end_id])

    def last_hidden(seq):
        with torch.no_grad():
            return reference(inputs_embeds=emb(seq[None])).last_hidden_state[0, -1]

    checked = 0
    for i, record in enumerate(records):
        thought = torch.cat([x[:i + 1], start])
        for _ in range(2):  # greedy, the meta tokens never chosen
            logits = model.logits(last_hidden(thought))
            thought = torch.cat([thought, logits.argmax()[None]])
        assert record.thought == model.tokenizer.decode(thought[i + 2:])
        gain = 0.0
        for s in range(3):
            if i + 1 + s >= len(x):
                break
            after = last_hidden(torch.cat([thought, end, x[i + 1:i + 1 + s]]))
            base = last_hidden(x[:i + 1 + s])
            with torch.no_grad():
                mixed, w = model.mixing_head(base, after)
                target = x[i + 1 + s]
                gain += float(model.logits(mixed).log_softmax(-1)[target]
                              - model.logits(base).log_softmax(-1)[target])
            if s == 0:
                assert record.weight == pytest.approx(float(w), abs=1e-5)
        if i + 1 < len(x):
            assert record.gain == pytest.approx(gain, abs=1e-4)
            checked += abs(gain) > 1e-3
    assert checked > len(records) // 2  # the head really changes the predictions


def test_untrained_model_gains_nothing():
    records = token_thoughts(make_model(), TEXT, thought_tokens=2)
    assert all(abs(r.gain) < 1e-4 and r.weight == 0 for r in records[:-1])
    assert math.isnan(records[-1].gain)
    with pytest.raises(ValueError, match="at least"):
        token_thoughts(make_model(), "H", thought_tokens=2)   # one token: nothing to predict


def test_texts_shorter_than_the_ahead_window():
    """Any text of 2 tokens or more, however short against ahead_tokens: each gain sums over the
    true next tokens there are, and equals score_thoughts on the text itself."""
    model = make_model(ahead_tokens=4)
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.4)
    ids = model.tokenizer("Hi").input_ids
    assert len(ids) == 2 < model.config.ahead_tokens + 1
    records = token_thoughts(model, "Hi", thought_tokens=2, thought_temperature=0.0)
    assert [r.steps for r in records] == [1, 0] and math.isnan(records[1].gain)
    x = torch.tensor([ids])
    with torch.no_grad():
        thoughts = model.sample_thoughts(x, num_tokens=2, temperature=0.0)
        scores = model.score_thoughts(x, thoughts)
    expected = (scores.mixed_logits[0, 0, 0].log_softmax(-1)[ids[1]]
                - scores.base_logits[0, 0].log_softmax(-1)[ids[1]])
    assert records[0].gain == pytest.approx(float(expected), abs=1e-5) and records[0].gain != 0
    assert [r.steps for r in token_thoughts(model, "Natalia", thought_tokens=2)] == [2, 1, 0]  # 3 tokens


def test_render_html_escapes_and_colours():
    records = [TokenThought("<b>", "x & y", 0.5, 0.1, 2), TokenThought(" a\n", "</span>", -0.25, -0.2, 1),
               TokenThought("end", "z", math.nan, 0.0, 0)]
    page = render_html(records, title="T<1>", subtitle="s")
    assert "&lt;b&gt;" in page and "x\u2423&amp;\u2423y" in page and "&lt;/span&gt;" in page and "T&lt;1&gt;" in page
    assert "<b>" not in page and "\u21b5" in page                  # the newline is made visible
    assert "rgba(0, 160, 60, 0.750)" in page                       # the largest gain: full green
    assert "rgba(220, 40, 40, 0.375)" in page                      # half of it, negative: half red
    assert "n/a (last token)" in page and "+0.500 nats over 2 tokens" in page
    assert "<script" not in page and "http" not in page            # self-contained


def test_whitespace_tokens_and_thoughts_are_visible_in_the_table_and_tooltips():
    """A token that is a bare space (or newline, tab, no-break space, nothing) must not be an
    empty table cell; the running text keeps its spaces so that it reads as written."""
    records = [TokenThought(" ", "  \n", 0.5, 0.1, 2), TokenThought("\n", "\t<", -0.1, 0.0, 1),
               TokenThought(" the", "", 0.2, 0.0, 1), TokenThought("\u00a0", "\u200b", math.nan, 0.0, 0)]
    page = render_html(records)
    cells = re.findall(r'<td class="code">(.*?)</td>', page, flags=re.S)
    assert cells == ["\u2423", "\u2423\u2423\u21b5", "\u21b5", "\u2192&lt;", "\u2423the", "\u2205",
                     "\\xa0", "\\u200b"]
    tips = re.findall(r'<span class="tip">thought: (.*?)\n', page)
    assert tips == ["\u2423\u2423\u21b5", "\u2192&lt;", "\u2205", "\\u200b"]
    assert '<span class="tok" ' in page and '"> <span class="tip">' in page  # the text: a plain space
    # With a real tokenizer: every token and thought cell of a text with runs of blanks shows something.
    model = make_model()
    text = "a  b\n\n c\t d"
    page = render_html(token_thoughts(model, text, thought_tokens=2))
    cells = re.findall(r'<td class="code">(.*?)</td>', page, flags=re.S)
    assert len(cells) == 2 * len(model.tokenizer(text).input_ids)
    assert all(cell and not any(ch.isspace() for ch in cell) for cell in cells), cells


def test_inspect_cli(tmp_path, capsys):
    saved = tmp_path / "model"
    make_model().save_pretrained(saved)
    out = tmp_path / "page.html"
    assert cli.main(["inspect", "--model", str(saved), "--text", TEXT, "--out", str(out),
                     "--thought-tokens", "2"]) == 0
    page = out.read_text()
    n_tokens = len(make_model().tokenizer(TEXT).input_ids)
    assert "thoughts of 2 tokens" in page and page.count('<tr><td class="num">') == n_tokens
    text_file = tmp_path / "text.txt"
    text_file.write_text(CORPUS[0])
    assert cli.main(["inspect", "--model", str(saved), "--text-file", str(text_file), "--out", str(out)]) == 0
    assert "thoughts of 3 tokens" in out.read_text()  # the model's k
    assert "wrote" in capsys.readouterr().out


def test_inspect_cli_needs_exactly_one_text(tmp_path, capsys):
    from quietstar.cli.inspect_thoughts import InspectArguments

    with pytest.raises(ValueError, match="--text TEXT or --text-file FILE"):
        InspectArguments()
    with pytest.raises(ValueError, match="not both"):
        InspectArguments(text="a b", text_file="t.txt")
    assert InspectArguments(text="a b").out == "thoughts.html"
    # The command checks before it loads any model (this one does not exist).
    missing = str(tmp_path / "no-model")
    assert cli.main(["inspect", "--model", missing]) == 2
    assert capsys.readouterr().err == ("quietstar inspect: error: give the text to inspect: "
                                       "--text TEXT or --text-file FILE\n")
    assert cli.main(["inspect", "--model", missing, "--text", "a b", "--text-file", "t.txt"]) == 2
    assert capsys.readouterr().err == "quietstar inspect: error: give --text or --text-file, not both\n"
    assert cli.main(["inspect", "--model", missing, "--text-file", str(tmp_path / "none.txt")]) == 2
    assert capsys.readouterr().err == f"quietstar inspect: error: --text-file {tmp_path / 'none.txt'} does not exist\n"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_page_renders_in_headless_chromium(tmp_path):
    model = make_model()
    with torch.no_grad():
        model.mixing_head.mlp[-1].bias.fill_(0.5)
    page = write_page(model, TEXT + "\n" + CORPUS[0], tmp_path / "page.html", thought_tokens=3)
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900",
                    f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = imread(shot)[..., :3]
    assert image.shape[:2] == (900, 1200)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    green = (g > r + 0.1) & (g > b + 0.05)     # tokens whose thought helped
    red = (r > g + 0.1) & (r > b + 0.1)        # tokens whose thought hurt
    assert green.sum() > 500 and red.sum() > 500
