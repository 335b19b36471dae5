"""``quietstar distill``: a thinking QuietStar model taught to a plain LM (no thoughts, no mixing
head), saved as a Hugging Face folder that transformers loads alone; every ``DistillConfig``
field is a flag.

Exit codes: 0 done, 2 bad input (``quietstar.cli.main``).
"""

from __future__ import annotations

import argparse

from quietstar.cli.common import check_device, command_main, parse_settings
from quietstar.training.distill_config import EXPORT_DIR, DistillConfig
from quietstar.utils.settings import add_dataclass_arguments

HELP = "train a plain LM to predict as a thinking model does"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every DistillConfig field."""
    parser.description = (f"{HELP}: KL(teacher with thoughts || student) on a corpus; the result is "
                          f"<output-dir>/{EXPORT_DIR}, a plain Hugging Face model folder.")
    add_dataclass_arguments(parser, DistillConfig, title="distillation")


def run(args: argparse.Namespace) -> int:
    config = parse_settings(DistillConfig, args)
    check_device(config.device)
    # Here, after the flags are checked: torch and transformers, which --help must not wait for.
    import logging

    from quietstar.training.distill import distill

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = distill(config)
    print(f"distilled {result.step} steps (kl {result.metrics.get('kl', float('nan')):.4f}); the plain model: "
          f"{result.model_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``quietstar distill ...`` from Python (``argv`` without the command name)."""
    return command_main("distill", argv)
