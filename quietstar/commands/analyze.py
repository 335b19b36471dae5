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

from ..analysis import difficulty_report, format_difficulty_table, token_nlls
from ..arguments import add_dataclass_arguments, option, parse_dataclass
from ..data import load_texts
from ..plots import plot_difficulty
from .common import ModelArguments, check_output, command_main, fail

HELP = "per-token NLL gains against token difficulty"


@dataclass
class AnalyzeArguments:
    """The settings of ``quietstar analyze`` (the model's: ``ModelArguments``)."""

    data: str
    """held-out text the model was not trained on: a .txt/.jsonl/.json/.parquet file or folder,
    builtin:arithmetic, or a Hugging Face dataset"""
    out: str
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every ModelArguments and AnalyzeArguments field."""
    add_dataclass_arguments(parser, ModelArguments, title="model")
    add_dataclass_arguments(parser, AnalyzeArguments, title="analysis")


def run(args: argparse.Namespace) -> int:
    try:
        model_args = parse_dataclass(ModelArguments, args)
        settings = parse_dataclass(AnalyzeArguments, args)
        check_output(settings.out, "--out", folder=True)
        if model_args.thought_tokens == 0:  # the analysis compares a thought with none
            raise ValueError("thought_tokens must be >= 1, got 0")
        model = model_args.load()
        texts = list(load_texts(settings.data, num_documents=settings.limit))
        K, T = model.config.thought_settings(model_args.thought_tokens, model_args.thought_temperature)
        if K < 1:
            raise ValueError(f"thought_tokens must be >= 1, got {K}")
        nll = token_nlls(model, texts, K, T, settings.max_length, settings.batch_size, model_args.seed,
                         progress=True, thought_source=settings.thought_source)
        report = difficulty_report(nll.base, nll.thinking, nll.document, settings.buckets,
                                   seed=model_args.seed)
    except (ValueError, FileNotFoundError) as e:
        return fail("analyze", e)
    report |= {"model": model_args.model, "data": settings.data, "documents": len(texts),
               "thought_source": settings.thought_source, "thought_tokens": K, "thought_temperature": T}
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_difficulty(report, out / "difficulty.png")
    print(format_difficulty_table(report))
    print(f"report and plot written to {out / 'report.json'} and {out / 'difficulty.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``quietstar analyze ...`` from Python (``argv`` without the command name)."""
    return command_main("analyze", argv)

