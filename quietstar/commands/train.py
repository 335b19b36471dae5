"""``quietstar train``: every TrainConfig and QuietStarConfig field as a flag, then the recipe.

``python -m quietstar train ...`` and ``accelerate launch -m quietstar train ...`` run it too.
Exit codes: 0 done, 130 interrupted (saved), 1 diverged (saved), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from ..arguments import add_dataclass_arguments, given_settings
from ..train import TrainConfig, TrainingDiverged, load_config, train

HELP = "train a model with Quiet-STaR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every TrainConfig and QuietStarConfig field (given flags override --config)."""
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="YAML file of settings (the same names as the flags, with the method's "
                             "under 'quietstar:'); flags given here override it")
    add_dataclass_arguments(parser, TrainConfig, TrainConfig(), title="training")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, given_settings(args, TrainConfig))
        result = train(config)
    except TrainingDiverged as e:
        print(f"quietstar train: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, PermissionError, ImportError) as e:
        print(f"quietstar train: error: {e}", file=sys.stderr)
        return 2
    return 130 if result.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quietstar train", description=HELP,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
