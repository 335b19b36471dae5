"""Loading an LM's weight files, a damaged one named: a safetensors file cut short by an
interrupted download or copy otherwise ends in the safetensors reader's traceback, which names
no file. Base models (``loading``) and saved QuietStar models (``saved_model``) load through here."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM

from quietstar.utils.errors import QuietStarInputError


def load_causal_lm(source: str | Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(source, **kwargs)``; a damaged safetensors file
    becomes a QuietStarInputError that names it (in a local folder) and the fix."""
    try:
        return AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    except SafetensorError as error:
        folder = Path(source).expanduser()
        damaged = damaged_safetensors(folder) if folder.is_dir() else []
        what = (", ".join(str(path) for path, _ in damaged) if damaged
                else f"a safetensors weights file of {source}")
        reason = damaged[0][1] if damaged else str(error)
        raise QuietStarInputError(
            f"{what} is damaged ({reason}): it was probably cut short by an interrupted download or copy; "
            "download it again (for a Hub model, delete it from the Hugging Face cache first) or re-save the "
            "model") from None


def damaged_safetensors(folder: Path) -> list[tuple[Path, str]]:
    """(file, what is wrong) for every ``*.safetensors`` file in ``folder`` whose header does
    not read or does not cover the file (cut short)."""
    damaged = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            damaged.append((path, str(error)))
    return damaged
