"""Which tokens do thoughts help? Per-token NLL against token difficulty.

The paper's analysis: thoughts help most on the tokens that are hardest for the base model. On
held-out text we take, for every token, the NLL of the base model and of the thinking model (the
mixed prediction of that token after a thought at the previous position), sort the tokens by base
NLL into equal-count buckets, and report the improvement (base - thinking) in each bucket, the
mean NLLs, and the NLLs on the hardest 10% of tokens, all with bootstrap 95% intervals.

Library use (the evidence experiments reuse this)::

    nll = token_nlls(model, texts, thought_tokens=8)
    report = difficulty_report(nll.base, nll.thinking, groups=nll.document)
    print(format_difficulty_table(report)); quietstar.plots.plot_difficulty(report, "difficulty.png")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .batching import model_device, pad_sequences
from .evaluation import next_token_logits
from .statistics import format_cell, summarize


@dataclass
class TokenNLLs:
    """Per-token NLLs (nats) of every predicted token of the texts, in text order."""

    base: np.ndarray      # [N] without thoughts
    thinking: np.ndarray  # [N] mixed prediction after a thought at the previous position
    document: np.ndarray  # [N] index of the text the token belongs to


def token_windows(texts: Sequence[str], tokenizer, max_length: int) -> list[tuple[int, list[int]]]:
    """(document, token ids) windows of at most ``max_length`` tokens. Consecutive windows of a
    text share one token, so every token after a text's first is predicted exactly once."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a token and its successor), got {max_length}")
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
               thought_source: str = "sampled") -> TokenNLLs:
    """Base and thinking NLL of every token of ``texts`` that has a predecessor.

    Thoughts have ``thought_tokens`` tokens (default the model's k) and are sampled at
    ``thought_temperature`` (default the model's; 0 = greedy) from a generator seeded with ``seed``
    (``thought_source`` "random" / "shifted": the controls of ``evaluation.thoughts_for``).
    ``thought_tokens=0`` measures the base model alone (``thinking`` is then ``base``).
    Long texts are cut into windows of ``max_length`` tokens.
    """
    K, T = model.config.thought_settings(thought_tokens, thought_temperature)
    tokenizer, device = model.tokenizer, model_device(model)
    windows = token_windows(texts, tokenizer, max_length)
    if not windows:
        raise ValueError("the texts hold no token with a predecessor; give longer texts")
    generator = torch.Generator(device).manual_seed(seed)
    base, thinking, document = [], [], []
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(windows), batch_size)
        for start in tqdm(starts, desc="token NLLs", disable=not progress, leave=False):
            batch = windows[start:start + batch_size]
            ids, mask = pad_sequences([w for _, w in batch], tokenizer.pad_token_id, "right", device)
            base_logits, mixed_logits = next_token_logits(model, ids, mask, K, T, generator,
                                                          thought_source)
            targets = ids[:, 1:]
            valid = mask[:, 1:].bool()
            for logits, out in ((base_logits, base), (mixed_logits, thinking))[:2 if K else 1]:
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
                out.append(nll[valid].cpu().numpy())
            document.append(np.repeat([d for d, _ in batch], valid.sum(1).cpu().numpy()))
    finally:
        model.train(was_training)
    base = np.concatenate(base)
    return TokenNLLs(base, np.concatenate(thinking) if K else base, np.concatenate(document))


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
        raise ValueError(f"base, other (and groups) must be 1-D arrays of one length; got "
                         f"{base.shape}, {other.shape}{'' if groups is None else f', {groups.shape}'}")
    if not 1 <= buckets <= base.size:
        raise ValueError(f"buckets must be between 1 and the number of tokens ({base.size}), got {buckets}")
    if not 0 < hardest_fraction <= 1:
        raise ValueError(f"hardest_fraction must be in (0, 1], got {hardest_fraction}")

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
