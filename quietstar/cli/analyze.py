"""``quietstar analyze``: which tokens do thoughts help? Per-token NLL gains against the tokens'
difficulty on held-out text, as a table, ``report.json`` and ``difficulty.png``.

Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from quietstar.utils.settings import add_dataclass_arguments, option
from quietstar.cli.common import LoadingArguments, ModelArguments, check_at_least, command_main, parse_settings
from quietstar.utils.errors import QuietStarInputError

HELP = "per-token NLL gains against token difficulty"


@dataclass
class AnalyzeArguments:
    """The settings of ``quietstar analyze`` (the model's: ``ModelArguments``)."""

    data: str
    """held-out text the model was not trained on: a .txt/.jsonl/.json/.parquet file or folder
    (a .txt file's documents are separated by blank lines), builtin:arithmetic, or a Hugging Face
    dataset"""
    out: str = option(output="folder")
    """folder for report.json and difficulty.png"""
    limit: int | None = option(None, shown_default="all")
    """use the first N documents only"""
    max_length: int = 256
    """tokens per window"""
    batch_size: int = 4
    """windows per model call"""
    buckets: int = 10
    """difficulty buckets (10 = deciles)"""
    thought_source: Literal["sampled", "random", "shifted"] = "sampled"
    """the model's own thoughts, or a control: random tokens, or the own thoughts of another
    position (does the content matter?)"""
    thought_fractions: tuple[float, ...] = (1.0,)
    """shares of the positions that think, each in (0, 1] (1 = every position), compared in a
    table: the difficulty report is the first's"""
    thought_selection: Literal["entropy", "random"] = "entropy"
    """which positions think at a share < 1: the highest base-prediction entropy, or random"""
    thought_health: bool = True
    """also the thoughts' health (leak rate, distinct thoughts, reward spread, thought length
    when thoughts may end early) from the model's training forward on the same windows"""

    def __post_init__(self):
        bad = [f for f in self.thought_fractions if not 0 < f <= 1]
        if bad or not self.thought_fractions:
            raise QuietStarInputError(f"--thought-fractions must be shares in (0, 1] (1 = every position), got "
                                      f"{','.join(map(str, self.thought_fractions)) or 'none'}")
        check_at_least(1, limit=self.limit, batch_size=self.batch_size, buckets=self.buckets)
        check_at_least(2, max_length=self.max_length)  # a token and its successor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every ModelArguments and AnalyzeArguments field."""
    add_dataclass_arguments(parser, ModelArguments, title="model")
    add_dataclass_arguments(parser, LoadingArguments, title="model loading")
    add_dataclass_arguments(parser, AnalyzeArguments, title="analysis")


def run(args: argparse.Namespace) -> int:
    model_args = parse_settings(ModelArguments, args)
    loading = parse_settings(LoadingArguments, args)
    settings = parse_settings(AnalyzeArguments, args)
    # Here, after the flags are checked: torch and matplotlib, which --help and a wrong flag
    # must not wait for.
    from quietstar.data.corpora import load_texts
    from quietstar.evaluation.analysis import (difficulty_report, format_difficulty_table, format_fraction_table,
                                               format_health, fraction_report, thought_health_report, token_nlls)
    from quietstar.evaluation.plots import plot_difficulty

    if model_args.thought_tokens == 0:  # the analysis compares a thought with none
        raise QuietStarInputError("--thought-tokens must be >= 1 (the analysis compares a thought with none), got 0")
    texts = list(load_texts(settings.data, num_documents=settings.limit))  # before the model: bad data fails fast
    if not texts:
        raise QuietStarInputError(f"--data {settings.data} holds no documents; give a file with text in it")
    model = loading.load(model_args.model, model_args.device)
    K, T = model.config.thought_settings(model_args.thought_tokens, model_args.thought_temperature)
    if K < 1:
        raise QuietStarInputError(f"--thought-tokens must be >= 1, got {K} (the model's own)")
    runs = [(f, token_nlls(model, texts, K, T, settings.max_length, settings.batch_size, model_args.seed,
                           progress=True, thought_source=settings.thought_source, thought_fraction=f,
                           thought_selection=settings.thought_selection))
            for f in settings.thought_fractions]
    nll = runs[0][1]
    report = difficulty_report(nll.base, nll.thinking, nll.document, settings.buckets,
                               seed=model_args.seed)
    fractions = fraction_report(runs, seed=model_args.seed) if len(runs) > 1 else None
    report |= {"model": model_args.model, "data": settings.data, "documents": len(texts),
               "thought_source": settings.thought_source, "thought_tokens": K, "thought_temperature": T,
               "thought_fraction": settings.thought_fractions[0], "thought_selection": settings.thought_selection}
    if fractions is not None:
        report["fractions"] = fractions
    health = None
    if settings.thought_health:
        health = thought_health_report(model, texts, settings.max_length, settings.batch_size, model_args.seed)
        report["thought_health"] = health
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_difficulty(report, out / "difficulty.png")
    print(format_difficulty_table(report))
    if fractions is not None:
        print(format_fraction_table(fractions))
    if health is not None:
        print(format_health(health))
    print(f"report and plot written to {out / 'report.json'} and {out / 'difficulty.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``quietstar analyze ...`` from Python (``argv`` without the command name)."""
    return command_main("analyze", argv)

