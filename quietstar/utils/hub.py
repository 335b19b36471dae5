"""The Hugging Face Hub questions every loader asks, answered one way: is the Hub to be left alone
(``offline``), and is a name meant as a Hub repo id rather than a local path (``is_hub_id``)."""

from __future__ import annotations

import os
from typing import Any

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # huggingface_hub's and transformers' spellings of "set"


def offline() -> bool:
    """Whether the Hub is not to be reached: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to 1, on,
    yes or true (any case). Read at each call: huggingface_hub reads them once, at import."""
    return any(os.environ.get(name, "").strip().upper() in TRUE_VALUES for name in OFFLINE_VARIABLES)


def is_hub_id(name: Any) -> bool:
    """Whether ``name`` is meant as a Hub repo id: ``"name"`` or ``"owner/name"`` as
    huggingface_hub accepts it (letters, digits, "-", "_" and "."; no "--" or ".."; at most 96
    characters), and no file or folder of that name exists here. Path syntax (absolute, "./",
    "~", a backslash, a second "/") is never an id, so a mistyped path fails as a missing path,
    without a Hub lookup."""
    if not isinstance(name, str) or os.path.exists(name):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # not for every --help

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
