"""The Hugging Face Hub questions every loader asks, answered one way: is the Hub to be left alone
(``offline``), is a name meant as a Hub repo id rather than a local path (``is_hub_id``; its form
alone: ``valid_repo_id``), and can this process push there (``check_can_push``, asked before a run
that pushes does any work)."""

from __future__ import annotations

import os
from typing import Any

from quietstar.utils.errors import QuietStarInputError

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
    return isinstance(name, str) and not os.path.exists(name) and valid_repo_id(name)


def valid_repo_id(name: str) -> bool:
    """Whether huggingface_hub accepts ``name`` as a repo id (``"name"`` or ``"owner/name"``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # not for every --help

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_can_push(repo_id: str) -> None:
    """Refuses, before any work, a push to ``repo_id`` that cannot happen: offline (a
    contradiction), no token (``HF_TOKEN`` or a cached ``hf auth login``), a token the Hub refuses
    or that can only read, or a Hub that cannot be reached. (Whether the token may write to that
    namespace the Hub says only at the push.)"""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    flag = f"--push-to-hub {repo_id}"
    if offline():
        raise QuietStarInputError(f"{flag} needs the network, but the Hub is switched off "
                                  f"({' / '.join(OFFLINE_VARIABLES)} is set); unset it, or train "
                                  "without --push-to-hub and upload the checkpoint's model folder "
                                  "later (hf upload)")
    token = get_token()
    if not token:
        raise QuietStarInputError(f"{flag} needs a Hugging Face token with write access: log in "
                                  "with `hf auth login` or set HF_TOKEN, or train without "
                                  "--push-to-hub")
    try:
        account = HfApi(token=token).whoami(token=token)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise QuietStarInputError(f"{flag}: the Hub refuses the Hugging Face token (401: invalid "
                                      "or expired); log in again with `hf auth login` or set another "
                                      "HF_TOKEN") from None
        raise QuietStarInputError(f"{flag}: the Hub could not check the token ({_first_line(e)}); "
                                  "try again, or train without --push-to-hub") from None
    except Exception as e:  # the HTTP client's own errors (DNS, connection, timeout): no network
        raise QuietStarInputError(f"{flag}: cannot reach the Hugging Face Hub ({type(e).__name__}: "
                                  f"{_first_line(e)}); check the network, or train without "
                                  "--push-to-hub (HF_HUB_OFFLINE=1 to work offline)") from None
    role = ((account or {}).get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise QuietStarInputError(f"{flag}: the Hugging Face token can only read; log in with a "
                                  "write token (`hf auth login`) or set HF_TOKEN to one")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
