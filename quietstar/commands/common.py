"""What several commands share: the model flags (``ModelArguments``) and the error exit."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..arguments import option
from ..models import EMBEDDED_MODEL, load_quietstar_model


@dataclass
class ModelArguments:
    """The model a command runs and how it thinks: ``quietstar eval``, ``analyze`` and ``inspect``."""

    model: str = EMBEDDED_MODEL
    """a saved QuietStar folder, or a plain model (folder, hub id or 'embedded:smollm2-135m-instruct')
    which is wrapped fresh, untrained"""
    device: str | None = option(None, shown_default="none: the model stays on the CPU")
    """cpu, cuda or auto"""
    dtype: str | None = option(None, shown_default="the checkpoint's")
    """float32, bfloat16 or float16"""
    thought_tokens: int | None = option(None, shown_default="the model's sampled_thought_tokens")
    """thought length K with thoughts on"""
    thought_temperature: float | None = option(None, shown_default="the model's thought_temperature")
    """thought sampling temperature, 0 = greedy"""
    seed: int = 0
    """seed of thought and answer sampling"""

    def __post_init__(self):
        check_thought_settings(self.thought_tokens, self.thought_temperature)

    def load(self):
        """The QuietStarForCausalLM named by ``model``, on ``device`` in ``dtype``."""
        return load_quietstar_model(self.model, self.device, self.dtype)


def check_thought_settings(thought_tokens: int | None, thought_temperature: float | None) -> None:
    """Refuses a negative --thought-tokens or --thought-temperature before any model is loaded."""
    if thought_tokens is not None and thought_tokens < 0:
        raise ValueError(f"--thought-tokens must be >= 0 (0 = no thought), got {thought_tokens}")
    if thought_temperature is not None and not (math.isfinite(thought_temperature)
                                                and thought_temperature >= 0):
        raise ValueError(f"--thought-temperature must be a finite number >= 0 (0 = greedy), got "
                         f"{thought_temperature}")


def check_output(path: str | Path, flag: str, folder: bool = False) -> Path:
    """``path`` where a command will write its results (a file, or a ``folder`` of files), checked
    before any work: it must not be a folder where a file goes (or a file where a folder goes),
    and its nearest existing parent must be a writable folder. Nothing is created here."""
    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder (it is created if missing)")
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    parent = path if folder else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path} lies inside {parent}, which is a file, not a folder; "
                         f"choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {parent} is not writable; choose another {flag}")
    return path


def command_main(command: str, argv: list[str] | None) -> int:
    """Runs ``quietstar <command> <argv>`` (``argv`` None: the process's arguments) through the one
    parser, so a command's module needs no parser of its own."""
    from ..cli import main

    return main([command, *(sys.argv[1:] if argv is None else argv)])


def fail(command: str, error: BaseException) -> int:
    """Reports bad input on one stderr line, as ``quietstar <command>: error: ...``; returns 2."""
    print(f"quietstar {command}: error: {error}", file=sys.stderr)
    return 2
