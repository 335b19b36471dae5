"""Plotting helpers shared by the analysis tools.

Figures are built with matplotlib's object API on the Agg canvas, never through ``pyplot``, so
plotting works on headless machines and leaves the caller's matplotlib state alone.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float = 7.0, height: float = 4.5) -> tuple[Figure, object]:
    """A figure (Agg canvas) with one axes, light grid."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Writes ``fig`` as a PNG (folders created as needed) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def plot_difficulty(report: dict, path: str | Path, title: str | None = None,
                    labels: tuple[str, str] = ("base", "thinking")) -> Path:
    """Mean NLL improvement (base - other) of each difficulty bucket against the bucket's mean base
    NLL, with 95% bootstrap intervals, from ``quietstar.evaluation.analysis.difficulty_report``."""
    buckets = report["buckets"]
    x = [b["base"]["mean"] for b in buckets]
    y = [b["improvement"]["mean"] for b in buckets]
    err = [[m - b["improvement"]["ci_low"] for m, b in zip(y, buckets)],
           [b["improvement"]["ci_high"] - m for m, b in zip(y, buckets)]]
    fig, ax = new_figure()
    ax.axhline(0.0, color="0.4", linewidth=1)
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color="tab:blue",
                label=f"NLL({labels[0]}) - NLL({labels[1]})")
    ax.set_xlabel(f"token difficulty: mean {labels[0]} NLL of the bucket (nats)")
    ax.set_ylabel("NLL improvement (nats / token)")
    ax.set_title(title or f"Improvement against difficulty ({len(buckets)} buckets of "
                          f"{report['n_tokens']} tokens by {labels[0]} NLL)")
    ax.legend(loc="best")
    return save_figure(fig, path)
