"""``quietstar inspect``: an HTML page of a text with the thought after each of its tokens,
coloured by how much the thought helped (``quietstar.evaluation.viewer``).

Named ``inspect_thoughts`` so that running it as a script does not shadow the standard library's
``inspect``. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from quietstar.utils.settings import add_dataclass_arguments, option
from quietstar.cli.common import LoadingArguments, ModelArguments, command_main, parse_settings
from quietstar.utils.errors import QuietStarInputError

HELP = "write an HTML page showing each token's thought"


@dataclass
class InspectArguments:
    """The settings of ``quietstar inspect`` (the model's: ``ModelArguments``); exactly one of
    ``text`` and ``text_file``."""

    text: str | None = option(None, shown_default="none")
    """the text to think about; give this or --text-file"""
    text_file: str | None = option(None, shown_default="none")
    """read the text from this file; give this or --text"""
    out: str = option("thoughts.html", output="file")
    """the HTML page to write"""

    def __post_init__(self):
        if self.text is None and self.text_file is None:
            raise QuietStarInputError("give the text to inspect: --text TEXT or --text-file FILE")
        if self.text is not None and self.text_file is not None:
            raise QuietStarInputError("give --text or --text-file, not both")


def read_text_file(path: str) -> str:
    """The text of --text-file, with errors that name the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"--text-file {path} does not exist") from None
    except IsADirectoryError:
        raise QuietStarInputError(f"--text-file {path} is a folder; give a text file") from None
    except UnicodeDecodeError as e:
        raise QuietStarInputError(f"--text-file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every ModelArguments and InspectArguments field."""
    add_dataclass_arguments(parser, ModelArguments, title="model")
    add_dataclass_arguments(parser, LoadingArguments, title="model loading")
    add_dataclass_arguments(parser, InspectArguments, title="text and page")


def run(args: argparse.Namespace) -> int:
    model_args = parse_settings(ModelArguments, args)
    loading = parse_settings(LoadingArguments, args)
    settings = parse_settings(InspectArguments, args)
    from quietstar.evaluation.viewer import model_display_name, write_page  # torch: not for a wrong flag

    text = settings.text if settings.text is not None else read_text_file(settings.text_file)
    model = loading.load(model_args.model, model_args.device)
    path = write_page(model, text, settings.out, model_args.thought_tokens,
                      model_args.thought_temperature, model_args.seed,
                      title=f"Quiet-STaR thoughts of {model_display_name(model_args.model)}")
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``quietstar inspect ...`` from Python (``argv`` without the command name)."""
    return command_main("inspect", argv)

