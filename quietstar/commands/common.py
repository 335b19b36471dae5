"""What several commands share: the model flags (``ModelArguments``) and the error exit."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

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


def fail(command: str, error: BaseException) -> int:
    """Reports bad input on one stderr line, as ``quietstar <command>: error: ...``; returns 2."""
    print(f"quietstar {command}: error: {error}", file=sys.stderr)
    return 2
