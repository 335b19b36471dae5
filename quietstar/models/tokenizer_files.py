"""Tokenizers read back exactly as they were saved.

transformers 5's ``AutoTokenizer.from_pretrained(folder)`` prefers the model type's own tokenizer
class to the saved pipeline: a folder whose ``config.json`` says ``qwen2`` gets a
``Qwen2Tokenizer`` rebuilt from the vocabulary and merges, even when the saved tokenizer is a
generic ``tokenizer.json`` (``TokenizersBackend``) of another model, and the text then tokenizes
differently (SmolLM2's tokenizer in a qwen2 folder: "\\n\\n" 198, 198 -> 1116). So:

* ``load_tokenizer`` reads a folder's generic fast tokenizer with the generic class, which runs
  ``tokenizer.json`` as saved, and anything else with ``AutoTokenizer``;
* ``save_tokenization_check`` writes the token ids of a few probe strings next to a saved model
  and ``verify_tokenization`` refuses a reload that tokenizes any of them differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quietstar.utils.errors import QuietStarInputError

CHECK_NAME = "quietstar_tokenizer_check.json"
# Whitespace runs, newlines, digits, punctuation, accents and a meta-token-like string: where
# tokenizers of one vocabulary but different pre-tokenizers or normalisers part ways.
PROBES = (
    "Natalia sold 48 clips in April.\n\nHow many in May? 48 / 2 = 24 #### 72",
    "  two  spaces,\ttab and trailing space ",
    "Ünïcödé café naïve – “quotes” 😀",
    "<|startofthought|>--- 3.14e-5 0x1F a_b-c",
    "\n\n\n",
)
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(folder: str | Path, **kwargs: Any):
    """The tokenizer saved in ``folder``: a generic ``tokenizer.json`` tokenizer as the generic
    class (its saved pipeline), any other with ``AutoTokenizer``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(folder)
    saved_class = None
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        try:
            saved_class = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise QuietStarInputError(f"{config_file} is not valid JSON ({e}); restore it or re-save the "
                                      "tokenizer") from None
    if saved_class in GENERIC_CLASSES and (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder), **kwargs)
    return AutoTokenizer.from_pretrained(str(folder), **kwargs)


def tokenization_of_probes(tokenizer) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False).input_ids for text in PROBES]


def save_tokenization_check(tokenizer, folder: str | Path) -> Path:
    """Writes ``<folder>/quietstar_tokenizer_check.json``: the probes and their token ids."""
    path = Path(folder) / CHECK_NAME
    path.write_text(json.dumps({"probes": list(PROBES), "ids": tokenization_of_probes(tokenizer)},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def verify_tokenization(tokenizer, folder: str | Path) -> None:
    """ValueError naming the first probe a reloaded ``tokenizer`` tokenizes differently from the
    saved one (no check file, as in folders saved before it existed: nothing to compare)."""
    path = Path(folder) / CHECK_NAME
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        pairs = list(zip(saved["probes"], saved["ids"], strict=True))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise QuietStarInputError(f"{path} is damaged ({e}); re-save the model") from None
    for text, ids in pairs:
        now = tokenizer(text, add_special_tokens=False).input_ids
        if now != ids:
            raise QuietStarInputError(
                f"the tokenizer read back from {Path(folder)} ({type(tokenizer).__name__}) tokenizes "
                f"{text!r} as {now[:12]} but the saved one as {ids[:12]}; the folder's tokenizer "
                "files and its tokenizer_config.json's tokenizer_class disagree: re-save the model "
                "with this version of quietstar, or load the tokenizer yourself and pass it to "
                "QuietStarForCausalLM.from_base")
