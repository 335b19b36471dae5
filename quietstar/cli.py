"""The `quietstar` command: a thin layer over the library API.

Each subcommand lives in the module that does the work and provides
``add_arguments(parser)`` and ``run(args) -> int | None``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("quietstar.commands.train", "train a model with Quiet-STaR"),
    "generate": ("quietstar.generation", "generate text, thinking before every token"),
    "eval": ("quietstar.evaluation", "GSM8K / CommonsenseQA / lm-eval scores with and without thoughts"),
    "analyze": ("quietstar.analysis", "per-token NLL gains against token difficulty"),
    "inspect": ("quietstar.inspect", "write an HTML page showing each token's thought"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quietstar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # not built yet
        command = sub.add_parser(name, help=help_text, description=help_text,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
