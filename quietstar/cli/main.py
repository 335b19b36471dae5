"""The `quietstar` command: a thin layer over the library API.

Each subcommand is a module of ``quietstar.cli`` that provides ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen command's module is imported (its flags are added when its
arguments are parsed), so one command does not pay for another's dependencies and
``quietstar --help`` imports none of them; a command module that fails to import raises.

``main`` is the one error boundary of every command: bad input (``USER_ERRORS``: a
``QuietStarInputError``, which includes a missing optional dependency, or an OSError such as a
missing or unreadable file) and bad flags end as one line ``quietstar <command>: error: <what is
wrong and what to do>`` on stderr and exit code 2, without a traceback; Ctrl-C outside training
exits 130. Any other exception is a bug and keeps its traceback. ``QUIETSTAR_TRACEBACK=1`` prints
the traceback of bad input too (before the one line). Commands raise such errors; they do not
catch them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from quietstar.utils.errors import QuietStarInputError

# name -> (module, help); the help is kept here so that listing the commands imports nothing.
COMMANDS = {
    "train": ("quietstar.cli.train", "train a model with Quiet-STaR"),
    "generate": ("quietstar.cli.generate", "generate text, thinking before every token"),
    "eval": ("quietstar.cli.eval", "GSM8K / CommonsenseQA / lm-eval scores with and without thoughts"),
    "analyze": ("quietstar.cli.analyze", "per-token NLL gains against token difficulty"),
    "inspect": ("quietstar.cli.inspect_thoughts", "write an HTML page showing each token's thought"),
    "distill": ("quietstar.cli.distill", "train a plain LM to predict as a thinking model does"),
}


USER_ERRORS = (QuietStarInputError, OSError)
"""What bad input raises: reported on one line, exit code 2 (anything else is a bug: traceback)."""
TRACEBACK_ENV = "QUIETSTAR_TRACEBACK"  # "1": show the traceback of bad input too


class Parser(argparse.ArgumentParser):
    """argparse, with a flag error on one line (not the usage of every flag, hundreds for train)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CommandParser(Parser):
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
    parser = Parser(prog="quietstar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=CommandParser)
    for name, (module_name, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, command_module=module_name,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.command_parsers = sub.choices  # name -> CommandParser
    return parser


def one_line(error: BaseException) -> str:
    """An error's message on one line (its lines joined with "; ")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Runs ``quietstar <argv>``; returns the exit code (2: bad input, reported on one line)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    command = parser.command_parsers[args.command]
    if unknown:
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            traceback.print_exc()
        print(f"quietstar {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quietstar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
