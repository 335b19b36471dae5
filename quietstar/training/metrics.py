"""What a training run writes down: every step's numbers, sample thoughts and the curves.

* ``MetricsLogger`` appends one JSON object per step to ``metrics.jsonl`` (always, flushed at once,
  so a crash loses nothing and another process can follow along) and forwards the same numbers to
  TensorBoard or Weights & Biases when asked (``report_to``).
* ``thought_samples`` / ``SampleWriter`` turn sampled thoughts into readable snippets
  ``…text «thought» next tokens`` in ``samples.jsonl`` and ``samples.md``.
* ``plot_training_curves`` draws ``metrics.jsonl`` into a PNG at the end of a run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from quietstar.training.config import REPORT_TO
from quietstar.utils.errors import MissingDependencyError, QuietStarInputError

METRICS_NAME = "metrics.jsonl"
SAMPLES_JSONL = "samples.jsonl"
SAMPLES_MD = "samples.md"
CURVES_NAME = "training_curves.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file; a torn last line (killed mid-write) is ignored."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate_after(path: Path, step: int) -> None:
    """Drop the records of steps after ``step``: a resumed run redoes them."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


class MetricsLogger:
    """Per-step metrics to ``<output_dir>/metrics.jsonl`` and, optionally, TensorBoard or W&B.

    ``resume_step`` (when continuing a run) first removes the records of later steps, which the
    interrupted run logged but the checkpoint does not contain, so the file reads as one run
    (-1: a fresh run in this folder, no record kept).
    """

    def __init__(self, output_dir: str | Path, report_to: str = "none",
                 run_config: dict[str, Any] | None = None, resume_step: int | None = None):
        if report_to not in REPORT_TO:
            raise QuietStarInputError(f"report_to must be one of {REPORT_TO}, got {report_to!r}")
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_NAME
        if resume_step is not None and self.path.exists():
            _truncate_after(self.path, resume_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._tensorboard = self._wandb = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise MissingDependencyError("--report-to tensorboard needs the tensorboard package: "
                                             "pip install tensorboard (or use --report-to none)") from e
            self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError as e:
                raise MissingDependencyError("--report-to wandb needs the wandb package: pip install wandb "
                                             "(or use --report-to none / tensorboard)") from e
            self._wandb = wandb.init(project="quietstar", name=self.output_dir.name,
                                     dir=str(self.output_dir), config=run_config, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        """Write one record; it must hold an int ``step``. Non-finite floats are written as null."""
        step = int(record["step"])
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in clean.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


# ------------------------------------------------------------------------------------- thoughts
def thought_samples(tokenizer, input_ids, thought_ids, positions: Iterable[int], ahead: int,
                    context_tokens: int = 12) -> list[dict[str, Any]]:
    """Readable thoughts of one sequence.

    ``input_ids`` [L] is the text, ``thought_ids`` [L, k] the thought sampled after each position.
    For each position i: the last ``context_tokens`` tokens up to x_i, the thought, and the
    ``ahead`` true tokens the thought was trained to predict.
    """
    ids = input_ids.tolist()
    samples = []
    for i in positions:
        context = tokenizer.decode(ids[max(0, i + 1 - context_tokens):i + 1])
        samples.append({
            "position": int(i),
            "context": context,
            "thought": tokenizer.decode(thought_ids[i].tolist()),
            "next": tokenizer.decode(ids[i + 1:i + 1 + ahead]),
        })
    return samples


def format_sample(sample: dict[str, Any]) -> str:
    """``…context «thought» next`` on one line (newlines shown as ⏎)."""
    def flat(text: str) -> str:
        return text.replace("\n", "⏎")
    return f"…{flat(sample['context'])} «{flat(sample['thought'])}» {flat(sample['next'])}"


class SampleWriter:
    """Appends sampled thoughts to ``samples.jsonl`` (one object per thought) and ``samples.md``."""

    def __init__(self, output_dir: str | Path, resume_step: int | None = None):
        output_dir = Path(output_dir)
        self.jsonl, self.markdown = output_dir / SAMPLES_JSONL, output_dir / SAMPLES_MD
        if resume_step is not None and self.jsonl.exists():
            _truncate_after(self.jsonl, resume_step)
            self._rewrite_markdown()
        elif not self.markdown.exists():
            self.markdown.write_text(self._header(), encoding="utf-8")

    @staticmethod
    def _header() -> str:
        return ("# Thoughts sampled during training\n\n"
                "Each line: the text up to a position, «the thought sampled there», and the true "
                "next tokens it was trained to help predict.\n")

    def _rewrite_markdown(self) -> None:
        lines, step = [self._header()], None
        for record in read_metrics(self.jsonl):
            if record["step"] != step:
                step = record["step"]
                lines.append(f"\n## Step {step}\n\n")
            lines.append(f"- `{format_sample(record)}`\n")
        self.markdown.write_text("".join(lines), encoding="utf-8")

    def write(self, step: int, samples: list[dict[str, Any]]) -> None:
        with self.jsonl.open("a", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, **sample}) + "\n")
        with self.markdown.open("a", encoding="utf-8") as f:
            f.write(f"\n## Step {step}\n\n")
            f.writelines(f"- `{format_sample(s)}`\n" for s in samples)


# ------------------------------------------------------------------------------------- curves
_PANELS = [  # (title, [(metric key, label)], log scale)
    ("Next-token loss (NLL)", [("base_nll", "without thought"), ("model_nll", "with thought"),
                               ("eval/nll_without_thought", "held-out, without"),
                               ("eval/nll_with_thought", "held-out, with")], False),
    ("Total loss", [("loss", "total (incl. policy term)")], False),
    ("Thoughts", [("thought_gain", "thought gain (log-lik.)"), ("mean_reward", "mean reward")],
     False),
    ("Mixing weight / reward spread / leak rate", [("mean_mixing_weight", "mean mixing weight"),
                                                   ("reward_spread", "reward spread (std over thoughts)"),
                                                   ("leak_rate", "leak rate (thoughts holding x_{i+1})")],
     False),
    ("Learning rate", [("lr", "lr")], False),
    ("Gradient norm (before clipping)", [("grad_norm", "grad norm")], True),
]
_NOT_SMOOTHED = ("lr",)  # a schedule, not a measurement; held-out points ("eval/...") neither


def smoothing_span(points: int) -> int:
    """The EMA span for a curve of ``points`` steps: a fifth of the run, at least 5."""
    return max(5, points // 5)


def smoothed(values: Iterable[float], span: int) -> list[float]:
    """The exponential moving average of ``values`` with weight 2 / (span + 1) for the newest
    point, bias-corrected (the first point is itself, not pulled towards 0)."""
    alpha, average, out = 2 / (span + 1), 0.0, []
    for t, value in enumerate(values, 1):
        average = (1 - alpha) * average + alpha * value
        out.append(average / (1 - (1 - alpha) ** t))
    return out


def curve_panels(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What ``plot_training_curves`` draws, panel by panel: {"title", "log_scale", "lines": [{"key",
    "label", "steps", "values", "smoothed" (None where not smoothed), "span"}]}. A per-step curve
    of 3 or more points gets its EMA (``smoothed``), drawn over the faded raw one: with batches
    of a few tokens the raw steps are mostly noise."""
    panels = []
    for title, series, log_scale in _PANELS:
        lines = []
        for key, label in series:
            points = [(r["step"], r[key]) for r in records
                      if isinstance(r.get(key), (int, float)) and not r.get("skipped")]
            if not points:
                continue
            steps, values = (list(v) for v in zip(*points))
            smooth = len(values) >= 3 and not key.startswith("eval/") and key not in _NOT_SMOOTHED
            span = smoothing_span(len(values))
            lines.append({"key": key, "label": label, "steps": steps, "values": values, "span": span,
                          "smoothed": smoothed(values, span) if smooth else None})
        panels.append({"title": title, "log_scale": log_scale, "lines": lines})
    return panels


def draw_training_curves(records: list[dict[str, Any]]):
    """A matplotlib figure of ``curve_panels(records)``: raw curves faded under their EMA."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for ax, panel in zip(axes.flat, curve_panels(records)):
        for line in panel["lines"]:
            if line["key"].startswith("eval/"):
                ax.plot(line["steps"], line["values"], "o-", label=line["label"], markersize=4)
            elif line["smoothed"] is None:
                ax.plot(line["steps"], line["values"], "-", label=line["label"])
            else:
                raw, = ax.plot(line["steps"], line["values"], "-", alpha=0.3, linewidth=1)
                ax.plot(line["steps"], line["smoothed"], "-", color=raw.get_color(), linewidth=2,
                        label=f"{line['label']}, EMA over {line['span']} steps")
        ax.set_title(panel["title"])
        ax.set_xlabel("step")
        if panel["lines"]:
            ax.legend(fontsize=8)
            if panel["log_scale"]:
                ax.set_yscale("log")
        ax.grid(alpha=0.3)
    return fig


def plot_training_curves(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Draws the curves of a metrics JSONL file into ``png_path`` (matplotlib, no display)."""
    fig = draw_training_curves(read_metrics(metrics_path))
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
