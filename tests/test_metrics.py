"""The training-curve plot: raw per-step curves with their EMA over them, on the data it plots."""

from __future__ import annotations

import json
import math
import random

import pytest

from quietstar.training.metrics import curve_panels, draw_training_curves, plot_training_curves, smoothed, smoothing_span


def noisy_records(steps: int = 40, seed: int = 0) -> list[dict]:
    """A falling loss under heavy noise (as batch 1 x 32 tokens gives), a schedule, held-out points."""
    rng = random.Random(seed)
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "base_nll": 3 - step / steps + rng.gauss(0, 0.5),
                  "model_nll": 3 - step / steps + rng.gauss(0, 0.5), "reward_spread": abs(rng.gauss(0.2, 0.1)),
                  "lr": 1e-4 * min(1, step / 4)}
        if step % 10 == 0:
            record["eval/nll_with_thought"] = 2.5 - step / 100
        records.append(record)
    records.append({"step": steps + 1, "skipped": True, "base_nll": float("nan")})  # a skipped step
    return records


def reference_ema(values, span):
    """The bias-corrected EMA written out: a weighted mean of the points so far, the newest
    weighted 2 / (span + 1), each older one by a further factor 1 - that."""
    alpha = 2 / (span + 1)
    out = []
    for t in range(len(values)):
        weights = [(1 - alpha) ** (t - i) for i in range(t + 1)]
        out.append(sum(w * v for w, v in zip(weights, values)) / sum(weights))
    return out


def test_smoothed_is_the_bias_corrected_ema():
    values = [4.0, 1.0, 3.0, -2.0, 5.0, 0.5]
    for span in (1, 3, 5):
        assert smoothed(values, span) == pytest.approx(reference_ema(values, span), abs=1e-12)
    assert smoothed(values, 1) == values  # span 1: no smoothing
    assert smoothed([2.0], 9) == pytest.approx([2.0], abs=1e-12)  # the first point is itself
    assert smoothing_span(20) == 5 and smoothing_span(400) == 80


def test_the_plot_draws_each_noisy_curve_with_its_ema_over_it():
    records = noisy_records()
    panels = {p["title"]: p for p in curve_panels(records)}
    nll = {line["key"]: line for line in panels["Next-token loss (NLL)"]["lines"]}
    raw = [r["base_nll"] for r in records if not r.get("skipped")]
    assert nll["base_nll"]["values"] == raw and nll["base_nll"]["steps"] == list(range(1, 41))
    assert nll["base_nll"]["span"] == 8
    assert nll["base_nll"]["smoothed"] == pytest.approx(reference_ema(raw, 8), abs=1e-12)
    # the EMA follows the trend with far less noise than the raw steps
    def roughness(xs):
        return sum((b - a) ** 2 for a, b in zip(xs, xs[1:])) / (len(xs) - 1)
    assert roughness(nll["base_nll"]["smoothed"]) < roughness(raw) / 5
    # held-out points and the schedule are drawn as they are
    assert nll["eval/nll_with_thought"]["smoothed"] is None
    assert panels["Learning rate"]["lines"][0]["smoothed"] is None
    assert [line["key"] for line in panels["Mixing weight / reward spread / leak rate"]["lines"]] == ["reward_spread"]

    fig = draw_training_curves(records)
    try:
        ax = fig.axes[0]  # the NLL panel: what is drawn is the data above
        drawn = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        assert drawn["without thought, EMA over 8 steps"] == pytest.approx(nll["base_nll"]["smoothed"])
        faded = [line for line in ax.get_lines() if list(line.get_ydata()) == raw]
        assert len(faded) == 1 and faded[0].get_alpha() == 0.3
        assert drawn["held-out, with"] == [2.4, 2.3, 2.2, 2.1]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_short_runs_are_not_smoothed_and_the_png_is_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in noisy_records(steps=2)))
    lines = curve_panels([json.loads(line) for line in path.read_text().splitlines()])[0]["lines"]
    assert all(line["smoothed"] is None for line in lines)
    png = plot_training_curves(path, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not math.isnan(lines[0]["values"][-1])
