"""The `quietstar` command: a thin layer over the library API.

Each subcommand is a module of ``quietstar.commands`` that provides ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen command's module is imported (its flags are added when its
arguments are parsed), so one command does not pay for another's dependencies and
``quietstar --help`` imports none of them; a command module that fails to import raises.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help); the help is kept here so that listing the commands imports nothing.
COMMANDS = {
    "train": ("quietstar.commands.train", "train a model with Quiet-STaR"),
    "generate": ("quietstar.commands.generate", "generate text, thinking before every token"),
    "eval": ("quietstar.commands.eval", "GSM8K / CommonsenseQA / lm-eval scores with and without thoughts"),
    "analyze": ("quietstar.commands.analyze", "per-token NLL gains against token difficulty"),
    "inspect": ("quietstar.commands.inspect_thoughts", "write an HTML page showing each token's thought"),
}


class CommandParser(argparse.ArgumentParser):
    """The parser of one command, whose module (and flags) is loaded on first use: when its
    arguments are parsed or its help is shown."""

    def __init__(self, *args, command_module: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.command_module = command_module

    def load(self) -> None:
        """Imports the command's module and adds its flags (once); import errors propagate."""
        if self.command_module is None:
            return
        module = importlib.import_module(self.command_module)
        self.command_module = None
        module.add_arguments(self)
        self.set_defaults(func=module.run)

    def parse_known_args(self, args=None, namespace=None):
        self.load()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.load()
        return super().format_usage()

    def format_help(self) -> str:
        self.load()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quietstar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=CommandParser)
    for name, (module_name, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, command_module=module_name,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
