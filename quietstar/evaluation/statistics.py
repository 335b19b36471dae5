"""Means with bootstrap 95% intervals, and how the result tables print them."""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_RESAMPLES = 1000


def bootstrap_ci(values, groups=None, confidence: float = 0.95, n_resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``.

    With ``groups`` (one label per value, e.g. the document of each token), whole groups are
    resampled, so values that move together (tokens of one text) are not counted as independent.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    if groups is None:
        sums, counts = values, np.ones_like(values)
    else:
        _, index = np.unique(np.asarray(groups), return_inverse=True)
        sums = np.bincount(index, weights=values)
        counts = np.bincount(index).astype(np.float64)
    picks = rng.integers(0, len(sums), size=(n_resamples, len(sums)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def summarize(values, groups=None, seed: int = 0) -> dict:
    """{"mean", "ci_low", "ci_high", "n"} of ``values`` (95% bootstrap interval)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_ci(values, groups, seed=seed)
    return {"mean": float(values.mean()) if values.size else math.nan,
            "ci_low": low, "ci_high": high, "n": int(values.size)}


def format_cell(summary: dict, signed: bool = False, digits: int = 3) -> str:
    """A ``summarize`` dict as a table cell: "mean [ci_low, ci_high]", ``digits`` decimals (with
    a sign when ``signed``, for differences)."""
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{fmt.format(summary['mean'])} [{fmt.format(summary['ci_low'])}, {fmt.format(summary['ci_high'])}]"


# Few seeds make the seed draw coarse (S^S combinations), so more resamples than elsewhere.
POOLED_RESAMPLES = 10_000


def seed_document_bootstrap(differences: np.ndarray, documents: np.ndarray, seed: int = 0,
                            n_resamples: int = POOLED_RESAMPLES, confidence: float = 0.95):
    """Percentile CI of the seed-averaged mean of ``differences`` [S seeds, T tokens].

    Each resample draws S seeds and the documents (all tokens of a document together) with
    replacement (documents shared by all seeds: every run scored the same ones); its value is the
    mean over the drawn seeds of the token mean over the drawn documents. Seed-to-seed variation
    thus counts as noise: with few seeds the interval is wide, as it should be."""
    S = differences.shape[0]
    _, index = np.unique(documents, return_inverse=True)
    sums = np.stack([np.bincount(index, weights=d) for d in differences])  # [S, documents]
    counts = np.bincount(index).astype(np.float64)
    rng = np.random.default_rng(seed)
    seed_picks = rng.integers(0, S, size=(n_resamples, S))
    doc_picks = rng.integers(0, len(counts), size=(n_resamples, len(counts)))
    per_seed = sums[:, doc_picks].sum(-1) / counts[doc_picks].sum(-1)  # [S, resamples]
    means = np.take_along_axis(per_seed.T, seed_picks, axis=1).mean(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def seed_summaries(differences: np.ndarray, documents: np.ndarray, seed: int = 0) -> dict:
    """``differences`` [S seeds, T tokens] summarised per seed (``summarize``, CI over documents)
    and seed-averaged (CI of ``seed_document_bootstrap``): {"per_seed": [...], "pooled": {...}}."""
    low, high = seed_document_bootstrap(differences, documents, seed)
    return {"per_seed": [summarize(d, documents, seed) for d in differences],
            "pooled": {"mean": float(differences.mean(1).mean()), "ci_low": low, "ci_high": high,
                       "n": int(differences.shape[1])}}
