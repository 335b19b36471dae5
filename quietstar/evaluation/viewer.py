"""Looking at thoughts: an HTML page of a text with the thought after each of its tokens.

Each token is coloured by its thought's gain: how much more likely the thought made the next true
tokens, sum over the ahead steps s of [log p_mixed(x_{i+1+s}) - log p_base(x_{i+1+s})] in nats
(the quantity Quiet-STaR's REINFORCE rewards); green helped, red hurt. Hovering a token shows its
thought, gain and mixing weight; a table beside the text lists them all, whitespace shown
(``visible_whitespace``: a token that is a bare space is ␣, not an empty cell). The page is one
self-contained file (inline CSS, no scripts, no network).

The ``quietstar inspect`` command (``quietstar/cli/inspect_thoughts.py``) writes it:
``quietstar inspect --model DIR --text "..." --out page.html``
"""

from __future__ import annotations

import html
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from quietstar.utils.batching import model_device
from quietstar.utils.modes import eval_mode
from quietstar.utils.errors import QuietStarInputError


@dataclass
class TokenThought:
    """The thought after one token of a text."""

    token: str     # the token at position i, as text
    thought: str   # the thought after it (inner tokens, decoded)
    gain: float    # nats; NaN for the last token (nothing left to predict)
    weight: float  # mixing weight of the prediction of the next token (ahead step 0)
    steps: int     # how many true next tokens the gain sums over (<= ahead_tokens)


@torch.no_grad()
def token_thoughts(model, text: str, thought_tokens: int | None = None,
                   thought_temperature: float | None = None, seed: int = 0) -> list[TokenThought]:
    """Samples a thought after every token of ``text`` and measures what it did.

    The gain of the thought at i sums, over the ahead steps s whose target x_{i+1+s} is in the
    text, log p_mixed(x_{i+1+s} | thought at i) - log p_base(x_{i+1+s} | x_0..x_{i+s}). Any text
    of at least 2 tokens (a token and the next one, which its thought helps to predict or not).
    """
    k, temperature = model.config.thought_settings(thought_tokens, thought_temperature)
    tokenizer, device = model.tokenizer, model_device(model)
    ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
    L, A = ids.shape[1], model.config.ahead_tokens
    if L < 2:
        raise QuietStarInputError(f"the text has {L} token{'' if L == 1 else 's'}; inspecting thoughts needs "
                                  "at least 2 (a token and the next one, which its thought predicts)")
    with eval_mode(model):
        generator = torch.Generator(device).manual_seed(seed)
        thoughts = model.sample_thoughts(ids, num_tokens=k, temperature=temperature, generator=generator)
        scores = model.score_thoughts(ids, thoughts)
    base_logp = scores.base_logits[0].float().log_softmax(-1)     # [L, V]
    mixed_logp = scores.mixed_logits[0].float().log_softmax(-1)   # [L, A, V]
    x = ids[0]
    records = []
    for i in range(L):
        steps = [s for s in range(A) if i + 1 + s < L]
        gain = sum(float(mixed_logp[i, s, x[i + 1 + s]] - base_logp[i + s, x[i + 1 + s]]) for s in steps)
        records.append(TokenThought(
            token=tokenizer.decode(x[i:i + 1]),
            thought=tokenizer.decode(thoughts[0, i]),
            gain=gain if steps else math.nan,
            weight=float(scores.mixing_weight[0, i, 0]),
            steps=len(steps)))
    return records


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { font-size: 1.3em; } .meta { color: #555; font-size: 0.9em; }
.text { font-family: ui-monospace, monospace; font-size: 1.05em; line-height: 2.1;
        border: 1px solid #ccc; padding: 1em; white-space: pre-wrap; word-break: break-word; }
.tok { position: relative; border-radius: 3px; padding: 1px 0; border-bottom: 3px solid transparent; }
.tok .tip { display: none; position: absolute; left: 0; top: 1.9em; z-index: 2; min-width: 14em;
            background: #222; color: #fff; padding: 0.4em 0.6em; border-radius: 4px;
            font-size: 0.85em; line-height: 1.4; white-space: pre-wrap; }
.tok:hover .tip { display: block; }
.tok:hover { outline: 1px solid #333; }
table { border-collapse: collapse; margin-top: 1.5em; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
td.code { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.legend span { display: inline-block; padding: 0 0.5em; margin-right: 0.3em; border-radius: 3px; }
"""


def _visible(token: str) -> str:
    """Token text in the running text: newlines and tabs marked, which would otherwise vanish
    (spaces stay spaces, so the text reads as written; each token's background shows it)."""
    return token.replace("\n", "\u21b5\n").replace("\t", "\u2192")


WHITESPACE_SYMBOLS = {" ": "\u2423", "\n": "\u21b5", "\t": "\u2192", "\r": "\u240d"}  # ␣ ↵ → ␍
EMPTY_SYMBOL = "\u2205"  # ∅: a token or thought that decodes to no text


def visible_whitespace(text: str) -> str:
    """``text`` for a table cell or a tooltip, where a space, a newline or an invisible character
    would leave the cell blank or look like nothing: spaces as ␣, newlines as ↵, tabs as →,
    carriage returns as ␍, any other blank or invisible character as its escape (``\\xa0``,
    ``\\u200b``), and no text at all as ∅."""
    return "".join(map(_visible_char, text)) if text else EMPTY_SYMBOL


def _visible_char(ch: str) -> str:
    if ch in WHITESPACE_SYMBOLS:
        return WHITESPACE_SYMBOLS[ch]
    if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp"):  # blank or invisible
        return ch.encode("unicode_escape").decode("ascii")
    return ch


def _colour(gain: float, scale: float) -> str:
    if math.isnan(gain) or scale == 0:
        return "transparent"
    alpha = min(1.0, abs(gain) / scale) * 0.75
    return f"rgba(0, 160, 60, {alpha:.3f})" if gain > 0 else f"rgba(220, 40, 40, {alpha:.3f})"


def render_html(records: list[TokenThought], title: str = "Quiet-STaR thoughts", subtitle: str = "") -> str:
    """The self-contained HTML page for ``token_thoughts``' records."""
    gains = [r.gain for r in records if not math.isnan(r.gain)]
    scale = max((abs(g) for g in gains), default=0.0)
    mean_gain = sum(gains) / len(gains) if gains else math.nan
    w_scale = max((abs(r.weight) for r in records), default=0.0)
    spans, rows = [], []
    for i, r in enumerate(records):
        gain_text = "n/a (last token)" if math.isnan(r.gain) else f"{r.gain:+.3f} nats over {r.steps} tokens"
        tip = f"thought: {visible_whitespace(r.thought)}\ngain: {gain_text}\nmixing weight: {r.weight:+.3f}"
        w_alpha = 0.0 if w_scale == 0 else abs(r.weight) / w_scale
        style = (f"background: {_colour(r.gain, scale)}; "
                 f"border-bottom-color: rgba(40, 80, 220, {w_alpha:.3f})")
        spans.append(f'<span class="tok" style="{style}">{html.escape(_visible(r.token))}'
                     f'<span class="tip">{html.escape(tip)}</span></span>')
        rows.append(f'<tr><td class="num">{i}</td><td class="code">{html.escape(visible_whitespace(r.token))}</td>'
                    f'<td class="code">{html.escape(visible_whitespace(r.thought))}</td>'
                    f'<td class="num" style="background: {_colour(r.gain, scale)}">'
                    f'{"n/a" if math.isnan(r.gain) else f"{r.gain:+.3f}"}</td>'
                    f'<td class="num">{r.weight:+.3f}</td></tr>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">{html.escape(subtitle)}</p>
<p class="meta legend">Background: the thought's gain, the log-likelihood of the next true tokens
with the thought minus without it: <span style="background: rgba(0,160,60,0.6)">helped</span>
<span style="background: rgba(220,40,40,0.6)">hurt</span> (full colour = {scale:.3f} nats).
Underline: the mixing weight (full blue = |w| {w_scale:.3f}). Hover a token to see its thought.
In the thoughts and the table \u2423 is a space, \u21b5 a newline, \u2192 a tab, \u2205 no text.
Mean gain {mean_gain:+.4f} nats per token.</p>
<div class="text">{"".join(spans)}</div>
<table><thead><tr><th>#</th><th>token</th><th>thought after it</th><th>gain (nats)</th>
<th>mixing weight</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
</body></html>
"""


def write_page(model, text: str, path: str | Path, thought_tokens: int | None = None,
               thought_temperature: float | None = None, seed: int = 0, title: str | None = None) -> Path:
    """Samples the thoughts of ``text`` and writes the HTML page to ``path``."""
    K, T = model.config.thought_settings(thought_tokens, thought_temperature)
    records = token_thoughts(model, text, K, T, seed)
    subtitle = (f"{len(records)} tokens; thoughts of {K} tokens sampled at temperature {T:g} "
                f"(seed {seed}); gains sum over up to {model.config.ahead_tokens} next tokens")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(records, title or "Quiet-STaR thoughts", subtitle), encoding="utf-8")
    return path


def model_display_name(name: str) -> str:
    """A model's name for people: a Hub id or the embedded name as given, a local folder by its
    own name (a checkpoint's ``model`` folder as ``<run>/checkpoint-<step>``), never its full path."""
    path = Path(name).expanduser()
    if not path.exists():
        return name
    path = path.resolve()
    if path.name == "model" and path.parent.name.startswith("checkpoint-"):
        return f"{path.parent.parent.name}/{path.parent.name}"
    return path.stem if path.is_file() else path.name
