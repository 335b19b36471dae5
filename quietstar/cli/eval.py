"""``quietstar eval``: GSM8K / CommonsenseQA scores (or any lm-evaluation-harness task), each
with thoughts off and on, printed as a table and optionally written as JSON.

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

HELP = "GSM8K / CommonsenseQA / lm-eval scores with and without thoughts"


@dataclass
class EvalArguments:
    """The settings of ``quietstar eval`` (the model's: ``ModelArguments``)."""

    task: Literal["gsm8k", "csqa"] = "gsm8k"
    """the question set"""
    data: str | None = option(None, shown_default="the Hugging Face Hub copy")
    """local JSONL in the dataset's own format"""
    limit: int | None = option(None, shown_default="all")
    """evaluate the first N items only"""
    metrics: tuple[str, ...] = ("direct",)
    """comma-separated, from direct,accuracy,cot. direct: the paper's teacher-forced expected
    accuracy, not argmax accuracy: with the gold answer after the prompt, each answer token's
    probability under the softmax restricted to the answer vocabulary (digits and newline for
    gsm8k, the choice letters and newline for csqa), multiplied over the answer's tokens (its
    closing newline included), the mean over items. accuracy: the greedy answer's exact match.
    cot: zero-shot chain of thought (gsm8k), a majority vote over --cot-samples answers"""
    batch_size: int = 8
    """sequences per model call"""
    cot_samples: int = 8
    """chain-of-thought samples per question"""
    cot_temperature: float = 0.7
    """sampling temperature of the chain-of-thought reasonings"""
    cot_max_tokens: int = 128
    """reasoning length limit"""
    lm_eval: tuple[str, ...] | None = option(None, metavar="TASK", shown_default="none: --task's metrics")
    """run lm-evaluation-harness tasks (comma-separated) instead, thoughts off and on"""
    lm_eval_include: str | None = option(None, metavar="DIR", shown_default="lm-eval's own tasks only")
    """folder of extra lm-eval task YAMLs (e.g. local task data)"""
    out: str | None = option(None, shown_default="not written", output="file")
    """write the results as JSON here"""

    def __post_init__(self):
        from quietstar.evaluation.tasks import METRICS  # torch: not for --help

        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise QuietStarInputError(f"--metrics: unknown metric(s) {unknown}; choose from {','.join(METRICS)}")
        if not self.metrics and not self.lm_eval:
            raise QuietStarInputError(f"--metrics is empty; choose from {','.join(METRICS)}")
        if self.lm_eval_include is not None and not self.lm_eval:
            raise QuietStarInputError("--lm-eval-include adds lm-eval tasks: it needs --lm-eval TASK")
        check_at_least(1, limit=self.limit, batch_size=self.batch_size, cot_samples=self.cot_samples,
                       cot_max_tokens=self.cot_max_tokens)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every ModelArguments and EvalArguments field."""
    add_dataclass_arguments(parser, ModelArguments, title="model")
    add_dataclass_arguments(parser, LoadingArguments, title="model loading")
    add_dataclass_arguments(parser, EvalArguments, title="evaluation")


def run(args: argparse.Namespace) -> int:
    model_args = parse_settings(ModelArguments, args)
    loading = parse_settings(LoadingArguments, args)
    settings = parse_settings(EvalArguments, args)
    from quietstar.evaluation.tasks import evaluate, format_table, load_items  # torch: not for --help

    if settings.lm_eval:
        from quietstar.evaluation.lm_eval_adapter import evaluate_lm_eval, format_lm_eval_table  # ImportError: not installed

        model = loading.load(model_args.model, model_args.device)
        results = evaluate_lm_eval(model, list(settings.lm_eval), model_args.thought_tokens,
                                   model_args.thought_temperature, settings.limit,
                                   settings.batch_size, settings.lm_eval_include, model_args.seed)
        table = format_lm_eval_table(results)
    else:
        items = load_items(settings.task, settings.data, settings.limit)  # before the model: bad data fails fast
        model = loading.load(model_args.model, model_args.device)
        results = evaluate(model, settings.task, items, list(settings.metrics),
                           model_args.thought_tokens, model_args.thought_temperature,
                           settings.batch_size, model_args.seed, settings.cot_samples,
                           settings.cot_temperature, settings.cot_max_tokens)
        table = format_table(results)
    results["model"] = model_args.model
    print(table)
    if settings.out:
        Path(settings.out).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {settings.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``quietstar eval ...`` from Python (``argv`` without the command name)."""
    return command_main("eval", argv)

