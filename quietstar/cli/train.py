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
from quietstar.training.config import BASE_KEY, DEFAULT_PRESET, DEFAULTS_PRESET, TrainConfig, differences, \
    load_config, presets, resolve_config
from quietstar.cli.common import check_outputs, command_main

HELP = "train a model with Quiet-STaR"
SETTINGS_RULE = (
    f"Settings come in layers, each over the ones before. A new run: the {DEFAULT_PRESET} preset "
    f"(the defaults shown below) < the --config file < the flags; a --config file layers on the "
    f"preset its '{BASE_KEY}:' key names ('{BASE_KEY}: {DEFAULTS_PRESET}': the dataclass defaults), "
    f"{DEFAULT_PRESET} without one, and --config PRESET is that preset alone. A resumed run: its "
    "own saved settings < the --config file (its base is not applied again) < the flags; the "
    "settings its checkpoint depends on (seed, seq_len, batch_size, LoRA, ...) cannot change. "
    "Every run starts by printing the settings that differ from the paper's defaults and where "
    "each came from.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every TrainConfig and QuietStarConfig field (given flags override --config), with
    the defaults of a new run (the default preset's) in the help."""
    parser.description = f"{HELP}. {SETTINGS_RULE}"
    parser.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS,
                        help="YAML file of settings (the same names as the flags, with the method's "
                             "under 'quietstar:'), layered on the preset its 'base:' key names "
                             f"({DEFAULT_PRESET} without one), or the name of a preset "
                             f"({', '.join(presets())}; {DEFAULTS_PRESET}: the paper's method; paper: its run); flags "
                             f"override it (default: the {DEFAULT_PRESET} preset, unless resuming: "
                             "then the run's own saved settings)")
    preset, paper = load_config(DEFAULT_PRESET), TrainConfig()
    notes = {name: f"from the {DEFAULT_PRESET} preset; {paper_value} with --config {DEFAULTS_PRESET}"
             for name, (_, paper_value) in differences(preset, paper).items()}
    add_dataclass_arguments(parser, TrainConfig, preset, title="training", notes=notes)


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: they bring torch and transformers, which --help must not wait for.
    from quietstar.training.checkpoint import resumed_settings
    from quietstar.training.recipe import TrainingDiverged, train

    try:
        given = given_settings(args, TrainConfig)
        config, origin = resolve_config(vars(args).get("config"), given, resumed_settings=resumed_settings,
                                        overrides_label="flags")
        check_outputs(config)
        # the process is this run's: tune it for training
        result = train(config, tune_cpu=True, origin=origin)
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

