"""``quietstar train``: every TrainConfig and QuietStarConfig field as a flag, then the recipe,
with the process tuned for training on a CPU run (``quietstar.training.cpu``; the process is the
run's own, unlike a Python caller's).

``python -m quietstar train ...`` and ``accelerate launch -m quietstar train ...`` run it too.
Exit codes: 0 done, 130 interrupted (saved), 1 diverged or the push to the Hub failed (saved),
2 bad input (``quietstar.cli.main``).
"""

from __future__ import annotations

import argparse
import sys

from quietstar.utils.settings import add_dataclass_arguments, given_settings
from quietstar.training.config import DEFAULT_PRESET, TrainConfig, config_file_path, load_config, presets
from quietstar.cli.common import check_outputs, command_main

HELP = "train a model with Quiet-STaR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every TrainConfig and QuietStarConfig field (given flags override --config)."""
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="YAML file of settings (the same names as the flags, with the method's "
                             "under 'quietstar:'), or the name of a preset "
                             f"({', '.join(presets())}); flags given here override it (default: "
                             f"the {DEFAULT_PRESET} preset, unless resuming: then the run's own "
                             "saved settings)")
    add_dataclass_arguments(parser, TrainConfig, TrainConfig(), title="training")


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: they bring torch and transformers, which --help must not wait for.
    from quietstar.training.checkpoint import resumed_settings
    from quietstar.training.recipe import TrainingDiverged, train

    try:
        given = given_settings(args, TrainConfig)
        config_file = args.config
        if config_file is None and not given.get("resume"):
            config_file = DEFAULT_PRESET
            print(f"quietstar train: starting from the {DEFAULT_PRESET} preset "
                  f"({config_file_path(DEFAULT_PRESET)}); --config FILE or PRESET for others",
                  file=sys.stderr)
        config = load_config(config_file, given, resumed_settings=resumed_settings)
        check_outputs(config)
        result = train(config, tune_cpu=True)  # the process is this run's: tune it for training
    except TrainingDiverged as e:
        print(f"quietstar train: {e}", file=sys.stderr)
        return 1
    finally:  # bad input propagates to quietstar.cli.main.main: one line, exit code 2
        _end_process_group()
    if result.interrupted:
        return 130
    return 1 if config.push_to_hub and result.pushed_to is None else 0  # trained, saved, not pushed


def _end_process_group() -> None:
    """Tears down the process group accelerate opened (DDP / FSDP / DeepSpeed runs): left to the
    interpreter's exit, gloo's threads can abort a process that already finished its work
    ("terminate called without an active exception"), failing the whole launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """``quietstar train ...`` from Python (``argv`` without the command name)."""
    return command_main("train", argv)

