"""Which tokens do thoughts help? Per-token NLL against token difficulty.

The paper's analysis: thoughts help most on the tokens that are hardest for the base model. On
held-out text we take, for every token, the NLL of the base model and of the thinking model (the
mixed prediction of that token after a thought at the previous position), sort the tokens by base
NLL into equal-count buckets, and report the improvement (base - thinking) in each bucket, the
mean NLLs, and the NLLs on the hardest 10% of tokens, all with bootstrap 95% intervals.

Library use (the evidence experiments reuse this)::

    nll = token_nlls(model, texts, thought_tokens=8)
    report = difficulty_report(nll.base, nll.thinking, groups=nll.document)
    print(format_difficulty_table(report)); quietstar.evaluation.plots.plot_difficulty(report, "difficulty.png")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quietstar.utils.batching import model_device, pad_sequences
from quietstar.utils.modes import eval_mode
from quietstar.evaluation.tasks import next_token_logits
from quietstar.method.objectives import thought_health
from quietstar.method.selection import check_thought_fraction
from quietstar.evaluation.statistics import format_cell, summarize
from quietstar.utils.errors import QuietStarInputError


@dataclass
class TokenNLLs:
    """Per-token NLLs (nats) of every predicted token of the texts, in text order."""

    base: np.ndarray      # [N] without thoughts
    thinking: np.ndarray  # [N] mixed prediction after a thought at the previous position
    document: np.ndarray  # [N] index of the text the token belongs to
    thought: np.ndarray | None = None  # [N] bool: the previous position thought (thought_fraction < 1)


def token_windows(texts: Sequence[str], tokenizer, max_length: int) -> list[tuple[int, list[int]]]:
    """(document, token ids) windows of at most ``max_length`` tokens. Consecutive windows of a
    text share one token, so every token after a text's first is predicted exactly once."""
    if max_length < 2:
        raise QuietStarInputError(f"max_length must be >= 2 (a token and its successor), got {max_length}")
    windows = []
    for d, text in enumerate(texts):
        ids = tokenizer(text).input_ids
        for start in range(0, max(len(ids) - 1, 1), max_length - 1):
            window = ids[start:start + max_length]
            if len(window) >= 2:
                windows.append((d, window))
    return windows


@torch.no_grad()
def token_nlls(model, texts: Sequence[str], thought_tokens: int | None = None,
               thought_temperature: float | None = None, max_length: int = 256,
               batch_size: int = 4, seed: int = 0, progress: bool = False,
               thought_source: str = "sampled", thought_fraction: float = 1.0,
               thought_selection: str = "entropy", think_at: np.ndarray | None = None) -> TokenNLLs:
    """Base and thinking NLL of every token of ``texts`` that has a predecessor.

    Thoughts have ``thought_tokens`` tokens (default the model's k) and are sampled at
    ``thought_temperature`` (default the model's; 0 = greedy) from a generator seeded with ``seed``
    (``thought_source`` "random" / "shifted": the controls of ``evaluation.thoughts_for``).
    ``thought_tokens=0`` measures the base model alone (``thinking`` is then ``base``). With
    ``thought_fraction`` < 1 only that share of each window's positions thinks, chosen as in
    training (``thought_selection``: "entropy" of the base prediction, or "random") by the model:
    in the rollout that samples the thoughts (``think``), for a control's thoughts before them
    (``choose_thought_positions``); the other tokens' thinking NLL is their base NLL. ``think_at``
    ([N] bool, in the order of the result) names the tokens to think for instead: only the
    positions before them think, the other tokens' thinking NLL is their base NLL. A thought
    changes only the prediction right after it, so the chosen tokens' NLLs are those of thinking
    everywhere, at a fraction of the cost (what a metric on a token subset needs). Long texts are
    cut into windows of ``max_length`` tokens.
    """
    check_thought_fraction(thought_fraction)
    if think_at is not None and thought_fraction < 1:
        raise QuietStarInputError("give either thought_fraction < 1 or think_at, not both")
    K, T = model.config.thought_settings(thought_tokens, thought_temperature)
    tokenizer, device = model.tokenizer, model_device(model)
    windows = token_windows(texts, tokenizer, max_length)
    if not windows:
        raise QuietStarInputError("the texts hold no token with a predecessor; give longer texts")
    if think_at is not None:
        n_tokens = sum(len(w) - 1 for _, w in windows)
        think_at = np.asarray(think_at)
        if think_at.dtype != bool or think_at.shape != (n_tokens,):
            raise QuietStarInputError(f"think_at must be a bool array of one entry per predicted token "
                                      f"({n_tokens}), got {think_at.dtype} {think_at.shape}")
    done = 0  # tokens of the result so far
    generator = torch.Generator(device).manual_seed(seed)
    base, thinking, document, thought = [], [], [], []
    with eval_mode(model):
        starts = range(0, len(windows), batch_size)
        for start in tqdm(starts, desc="token NLLs", disable=not progress, leave=False):
            batch = windows[start:start + batch_size]
            ids, mask = pad_sequences([w for _, w in batch], tokenizer.pad_token_id, "right", device)
            targets = ids[:, 1:]
            valid = mask[:, 1:].bool()
            count = int(valid.sum())  # tokens of this batch in the result
            at_fraction = thought_fraction < 1 and K
            chosen = None  # [B, L] bool: the positions that think; None: every one
            if at_fraction and thought_source == "sampled":  # chosen in the rollout, from its text pass
                _, scores = model.think(ids, mask, K, T, generator, steps=1, thought_fraction=thought_fraction,
                                        thought_selection=thought_selection)
                base_logits, mixed_logits = scores.base_logits, scores.mixed_logits[:, :, 0]
                chosen = scores.thought_positions
            else:
                if at_fraction:  # a control's thoughts are made for the positions: those first
                    chosen = model.choose_thought_positions(ids, mask, thought_fraction, thought_selection, generator)
                elif think_at is not None and K:  # the position before each chosen token
                    chosen = torch.zeros_like(mask, dtype=torch.bool)
                    chosen[:, :-1][valid] = torch.from_numpy(think_at[done:done + count]).to(device)
                base_logits, mixed_logits = next_token_logits(model, ids, mask, K, T, generator,
                                                              thought_source, chosen)
            if at_fraction:
                thought.append(chosen[:, :-1][valid].cpu().numpy())
            done += count
            for logits, out in ((base_logits, base), (mixed_logits, thinking))[:2 if K else 1]:
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
                out.append(nll[valid].cpu().numpy())
            document.append(np.repeat([d for d, _ in batch], valid.sum(1).cpu().numpy()))
    base = np.concatenate(base)
    return TokenNLLs(base, np.concatenate(thinking) if K else base, np.concatenate(document),
                     np.concatenate(thought) if thought else None)


@torch.no_grad()
def thought_health_report(model, texts: Sequence[str], max_length: int = 256, batch_size: int = 4,
                          seed: int = 0) -> dict:
    """What the model's thoughts look like on ``texts``: its training forward on every window
    (its objective, its thinking positions and n thoughts per position; no update, the model in
    eval mode; an rlp model without its EMA copy measures against itself), then per thought that
    counts (at a thinking position with a next token), as the training log's
    ``objectives.thought_health``:

        leak_rate          share of thoughts that contain the next true token x_{i+1}
        distinct_thoughts  distinct thoughts among a position's n, over n (1: all differ)
        reward_spread      std of the objective's reward over a position's n thoughts
        thought_length     mean count of a thought's own tokens; only with ``thought_can_end``

    Returns those means over all counted thoughts, and "thoughts": how many counted."""
    tokenizer, device = model.tokenizer, model_device(model)
    windows = token_windows(texts, tokenizer, max_length)
    if not windows:
        raise QuietStarInputError("the texts hold no token with a predecessor; give longer texts")
    n = model.config.thoughts_per_position
    rollout = model.rollout
    generator = torch.Generator(device).manual_seed(seed)
    sums = {"leak_rate": 0.0, "distinct_thoughts": 0.0, "reward_spread": 0.0, "thought_length": 0.0}
    total = 0
    with eval_mode(model):
        for start in range(0, len(windows), batch_size):
            ids, mask = pad_sequences([w for _, w in windows[start:start + batch_size]], tokenizer.pad_token_id,
                                      "right", device)
            short = model.config.ahead_tokens + 1 - ids.shape[1]  # the forward needs A + 1 positions
            if short > 0:
                ids, mask = F.pad(ids, (0, short), value=tokenizer.pad_token_id), F.pad(mask, (0, short))
            labels = ids.masked_fill(mask == 0, -100)
            out = model(ids, mask, labels, generator=generator, check_finite=False)
            B, _, L, k = out.thought_ids.shape
            thoughts = out.thought_ids.reshape(B * n, L, k)
            own = rollout.thought_mask(thoughts, rollout.fed_tokens(thoughts))
            own = torch.ones_like(thoughts, dtype=torch.bool) if own is None else own
            counted = torch.zeros_like(mask, dtype=torch.bool)
            counted[:, :-1] = (labels[:, 1:] != -100) & mask[:, :-1].bool()
            if out.thought_positions is not None:
                counted &= out.thought_positions
            next_tokens = F.pad(ids[:, 1:], (0, 1), value=tokenizer.pad_token_id)
            health = thought_health(thoughts, own, next_tokens.repeat_interleave(n, 0),
                                    counted.repeat_interleave(n, 0), n)
            health["reward_spread"] = out.metrics["reward_spread"]
            count = int(counted.sum()) * n
            for key in sums:
                sums[key] += health[key].item() * count
            total += count
    report = {key: value / max(total, 1) for key, value in sums.items()} | {"thoughts": total}
    if not model.config.thought_can_end:
        del report["thought_length"]  # always k
    return report


def format_health(report: dict) -> str:
    """One line of ``thought_health_report``'s result."""
    parts = [f"leak rate {report['leak_rate']:.1%}", f"distinct thoughts {report['distinct_thoughts']:.1%}",
             f"reward spread {report['reward_spread']:.3g}"]
    if "thought_length" in report:
        parts.append(f"thought length {report['thought_length']:.1f}")
    return f"thought health ({report['thoughts']} thoughts): " + ", ".join(parts)


def difficulty_report(base, other, groups=None, buckets: int = 10, hardest_fraction: float = 0.1,
                      seed: int = 0) -> dict:
    """Compares per-token NLLs ``other`` against ``base`` by the tokens' base difficulty.

    Tokens are ranked by base NLL and split into ``buckets`` equal-count buckets (deciles by
    default); the hardest ``hardest_fraction`` of tokens are also reported alone. Improvements are
    base - other (positive: ``other`` predicts better). With ``groups`` (e.g. the document of each
    token) the bootstrap resamples whole groups.

    Returns {"n_tokens", "mean": {"base", "other", "improvement"}, "hardest": {"fraction",
    "min_base_nll", "base", "other", "improvement"}, "buckets": [{"min_base_nll", "max_base_nll",
    "base", "other", "improvement"}]}, each leaf a ``summarize`` dict (mean, ci_low, ci_high, n).
    """
    base, other = np.asarray(base, np.float64), np.asarray(other, np.float64)
    groups = None if groups is None else np.asarray(groups)
    if base.shape != other.shape or base.ndim != 1 or (groups is not None and groups.shape != base.shape):
        raise QuietStarInputError(f"base, other (and groups) must be 1-D arrays of one length; got "
                                  f"{base.shape}, {other.shape}{'' if groups is None else f', {groups.shape}'}")
    if not 1 <= buckets <= base.size:
        raise QuietStarInputError(f"buckets must be between 1 and the number of tokens ({base.size}), got {buckets}")
    if not 0 < hardest_fraction <= 1:
        raise QuietStarInputError(f"hardest_fraction must be in (0, 1], got {hardest_fraction}")

    def compare(index: np.ndarray) -> dict:
        g = None if groups is None else groups[index]
        return {"base": summarize(base[index], g, seed), "other": summarize(other[index], g, seed),
                "improvement": summarize(base[index] - other[index], g, seed)}

    order = np.argsort(base, kind="stable")  # easiest first
    hardest = order[-max(1, math.ceil(hardest_fraction * base.size)):]
    return {
        "n_tokens": int(base.size),
        "mean": compare(order),
        "hardest": {"fraction": hardest_fraction, "min_base_nll": float(base[hardest].min()),
                    **compare(hardest)},
        "buckets": [{"min_base_nll": float(base[b].min()), "max_base_nll": float(base[b].max()),
                     **compare(b)} for b in np.array_split(order, buckets)],
    }


def format_difficulty_table(report: dict, labels: tuple[str, str] = ("base", "thinking")) -> str:
    """A one-screen table of ``difficulty_report``'s result."""
    head = (f"{'tokens':<22}{'n':>7}  {labels[0] + ' NLL':<24}{labels[1] + ' NLL':<24}"
            f"{'improvement':<24}")
    lines = [f"NLL (nats/token) by {labels[0]} difficulty; mean [95% bootstrap CI], "
             f"improvement = {labels[0]} - {labels[1]}", head]

    def row(name: str, r: dict) -> str:
        return (f"{name:<22}{r['base']['n']:>7}  {format_cell(r['base']):<24}"
                f"{format_cell(r['other']):<24}{format_cell(r['improvement'], True):<24}")

    lines.append(row("all", report["mean"]))
    hardest = report["hardest"]
    lines.append(row(f"hardest {hardest['fraction']:.0%}", hardest))
    for b in report["buckets"]:
        lines.append(row(f"[{b['min_base_nll']:.2f}, {b['max_base_nll']:.2f}]", b))
    return "\n".join(lines)


def fraction_report(runs: Sequence[tuple[float, TokenNLLs]], hardest_fraction: float = 0.1,
                    seed: int = 0) -> list[dict]:
    """Thinking at a share of the positions, compared: for each (thought_fraction, its TokenNLLs)
    of the same tokens, the share of tokens whose position thought, and the NLL improvement
    (base - thinking) over all tokens and over the hardest ``hardest_fraction``, with bootstrap
    intervals over documents; "kept" is the mean improvement relative to the first run's.

    Returns [{"thought_fraction", "hardest_fraction", "thought_share", "improvement",
    "hardest_improvement", "kept"}]."""
    rows, first = [], None
    for fraction, nll in runs:
        report = difficulty_report(nll.base, nll.thinking, nll.document, buckets=1,
                                   hardest_fraction=hardest_fraction, seed=seed)
        gain = report["mean"]["improvement"]["mean"]
        first = gain if first is None else first
        rows.append({"thought_fraction": fraction, "hardest_fraction": hardest_fraction,
                     "thought_share": 1.0 if nll.thought is None else float(nll.thought.mean()),
                     "improvement": report["mean"]["improvement"],
                     "hardest_improvement": report["hardest"]["improvement"],
                     "kept": gain / first if first else float("nan")})
    return rows


def format_fraction_table(rows: list[dict]) -> str:
    """A one-screen table of ``fraction_report``'s result."""
    lines = ["NLL improvement (base - thinking, nats/token) by the share of positions that think; "
             "mean [95% bootstrap CI]",
             f"{'fraction':<10}{'thought':>8}  {'all tokens':<24}"
             f"{'hardest ' + format(rows[0]['hardest_fraction'], '.0%'):<24}{'kept':>6}"]
    for r in rows:
        lines.append(f"{r['thought_fraction']:<10g}{r['thought_share']:>8.1%}  "
                     f"{format_cell(r['improvement'], True):<24}{format_cell(r['hardest_improvement'], True):<24}"
                     f"{r['kept']:>6.0%}")
    return "\n".join(lines)
