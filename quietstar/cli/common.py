"""What several commands share: the model flags (``ModelArguments``, ``LoadingArguments``),
settings parsed with their output paths checked (``parse_settings``), and ``command_main``.

Errors are not caught here: a command raises QuietStarInputError / OSError for bad input and
``quietstar.cli.main.main``, the one error boundary, reports it on one line with exit code 2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from quietstar.utils.settings import OUTPUT, option, parse_dataclass
from quietstar.method.config import check_thought_settings
from quietstar.models.loading import EMBEDDED_MODEL, load_quietstar_model, resolve_device, resolve_dtype
from quietstar.utils.errors import QuietStarInputError


@dataclass
class ModelArguments:
    """The model a command runs and how it thinks: ``quietstar eval``, ``analyze`` and ``inspect``."""

    model: str = EMBEDDED_MODEL
    """a saved QuietStar folder or Hub repo, or a plain model (folder, hub id or
    'embedded:smollm2-135m-instruct') which is wrapped fresh, untrained"""
    device: str | None = option(None, shown_default="none: the model stays on the CPU")
    """cpu, cuda or auto"""
    thought_tokens: int | None = option(None, shown_default="the model's sampled_thought_tokens")
    """thought length K with thoughts on"""
    thought_temperature: float | None = option(None, shown_default="the model's thought_temperature")
    """thought sampling temperature, 0 = greedy"""
    seed: int = 0
    """seed of thought and answer sampling"""

    def __post_init__(self):
        check_thought_settings(self.thought_tokens, self.thought_temperature)  # before any model is loaded
        check_device(self.device)


@dataclass
class LoadingArguments:
    """How ``--model`` is loaded, with transformers' usual meaning: ``generate``, ``eval``,
    ``analyze``, ``inspect`` (``train`` has ``--revision`` and ``--cache-dir`` in ``TrainConfig``,
    and its ``--precision`` for the dtype)."""

    dtype: str | None = option(None, shown_default="the checkpoint's")
    """parameter dtype: float32, bfloat16 (bf16), float16 (fp16) or auto"""
    revision: str | None = option(None, shown_default="the Hub repo's default branch")
    """for a Hub id: the branch, tag or commit to load"""
    cache_dir: str | None = option(None, metavar="DIR", shown_default="the Hugging Face cache")
    """Hugging Face hub cache folder to read a Hub id from (offline, HF_HUB_OFFLINE=1: only
    from there)"""
    device_map: str | None = option(None, shown_default="none: --device places the model")
    """transformers' placement, e.g. auto or cpu (needs accelerate), instead of --device"""

    def __post_init__(self):
        try:
            resolve_dtype(self.dtype)
        except ValueError as e:
            raise QuietStarInputError(f"--dtype: {e}") from None
        if self.device_map is not None and importlib.util.find_spec("accelerate") is None:
            raise QuietStarInputError(f"--device-map {self.device_map} needs the package accelerate: "
                                      "pip install accelerate (or use --device)")

    def load(self, model: str, device: str | None):
        """The QuietStarForCausalLM named by ``model``, loaded so, then moved to ``device``."""
        if device is not None and self.device_map is not None:
            raise QuietStarInputError("give --device or --device-map, not both")
        return load_quietstar_model(model, device, self.dtype, revision=self.revision,
                                    cache_dir=self.cache_dir, device_map=self.device_map)


def check_device(device: str | None) -> None:
    """Refuses a device torch does not know or this machine lacks, before any model is loaded."""
    try:
        resolve_device(device)
    except ValueError as e:
        raise QuietStarInputError(f"--device: {e}") from None


def check_at_least(minimum: int, **values: int | None) -> None:
    """Refuses an integer setting below ``minimum`` (None: not given), naming its flag."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise QuietStarInputError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def check_output(path: str | Path, flag: str, folder: bool = False) -> Path:
    """``path`` where a command will write its results (a file, or a ``folder`` of files), checked
    before any work: it must not be a folder where a file goes (or a file where a folder goes),
    and its nearest existing parent must be a folder this process can create files in (tried
    with a temporary file, so that root's permissions and read-only file systems count).
    Nothing is left behind."""
    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise QuietStarInputError(f"{flag} {path} is a file; give a folder (it is created if missing)")
    if not folder and path.is_dir():
        raise QuietStarInputError(f"{flag} {path} is a folder; give a file name")
    parent = path if folder else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise QuietStarInputError(f"{flag} {path} lies inside {parent}, which is a file, not a folder; "
                                  f"choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".quietstar-write-test-", dir=parent)
    except OSError as e:
        raise QuietStarInputError(f"{flag} {path}: cannot create files in {parent} ({e.strerror or e}); "
                                  f"choose another {flag}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_outputs(settings) -> None:
    """Checks every output path of a settings dataclass (the fields declared with
    ``option(..., output="file" | "folder")``) with ``check_output``."""
    for f in dataclasses.fields(settings):
        kind, value = f.metadata.get(OUTPUT), getattr(settings, f.name)
        if kind is not None and value is not None:
            check_output(value, "--" + f.name.replace("_", "-"), folder=kind == "folder")


def parse_settings(cls: type, args):
    """``cls`` from the flags given (``parse_dataclass``), its output paths checked before any
    work (``check_outputs``)."""
    settings = parse_dataclass(cls, args)
    check_outputs(settings)
    return settings


def command_main(command: str, argv: list[str] | None) -> int:
    """Runs ``quietstar <command> <argv>`` (``argv`` None: the process's arguments) through the one
    parser, so a command's module needs no parser of its own."""
    from quietstar.cli.main import main

    return main([command, *(sys.argv[1:] if argv is None else argv)])
