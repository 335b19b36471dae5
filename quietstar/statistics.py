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
