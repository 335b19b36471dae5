"""The thought-free export: a QuietStar model's LM as a plain Hugging Face model folder.

``export_plain`` writes the LM's ``config.json`` and safetensors weights, the tokenizer without
the meta tokens and a model card (``README.md``) naming what the model was distilled from.
``transformers.AutoModelForCausalLM`` and ``AutoTokenizer`` load the folder with no quietstar
installed; generating costs one decoder call per token, as the base model.

The vocabulary. The LM's embedding and head matrices have the base model's shape: quietstar
never adds rows for START/END (``MetaTokenEmbedding`` keeps their vectors apart, in the head
file, which is not written here). Where the base matrices have padding rows beyond the tokenizer
(many models round the vocabulary up), the meta ids fall on such rows, which the base model has
as well and which no text token reaches. The tokenizer's two added meta tokens are removed from
its files (``tokenizer.json``'s added tokens, ``tokenizer_config.json``'s special tokens and
record of them), and the result is read back and checked: no meta token left, every probe text
tokenized as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from quietstar.method.meta_tokens import META_TOKENS_KEY
from quietstar.models.model_card import CARD_NAME
from quietstar.models.tokenizer_files import PROBES, load_tokenizer
from quietstar.utils.errors import QuietStarInputError
from quietstar.utils.log_filters import quiet_transformers

# The tokenizer_config.json keys that list special tokens by their strings.
SPECIAL_LIST_KEYS = ("extra_special_tokens", "additional_special_tokens")


@dataclass
class DistillFacts:
    """What the model card of an exported model says about where it came from."""

    teacher: str                 # the QuietStar model distilled from (folder or Hub repo)
    data: str
    steps: int                   # optimiser steps of distillation (0: the teacher's own LM, exported)
    tokens_per_step: int
    temperature: float
    next_token_loss_weight: float
    thought_fraction: float      # share of the positions at which the teacher thought
    thought_tokens: int          # the teacher's k


def export_plain(lm, tokenizer, directory: str | Path, *, meta_tokens: tuple[str, str],
                 facts: DistillFacts) -> Path:
    """Writes ``lm`` (a transformers causal LM), ``tokenizer`` without ``meta_tokens`` and the model
    card of ``facts`` into ``directory``; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        lm.save_pretrained(directory)
    _drop_attention_override(directory)
    save_plain_tokenizer(tokenizer, directory, meta_tokens)
    (directory / CARD_NAME).write_text(render_distilled_card(lm, facts), encoding="utf-8")
    return directory


def _drop_attention_override(directory: Path) -> None:
    """quietstar routes the LM's attention to its own function; the saved config must not name it
    (transformers records the implementation only when asked; removed here if it did)."""
    path = directory / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if str(config.get("_attn_implementation", "")).startswith("quietstar") or \
            str(config.get("attn_implementation", "")).startswith("quietstar"):
        config.pop("_attn_implementation", None)
        config.pop("attn_implementation", None)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_plain_tokenizer(tokenizer, directory: str | Path, meta_tokens: tuple[str, str]) -> None:
    """Saves ``tokenizer`` into ``directory`` with the added ``meta_tokens`` removed from its files,
    then reads it back and checks it (QuietStarInputError where this tokenizer's files cannot be
    stripped so)."""
    directory = Path(directory)
    with quiet_transformers():
        tokenizer.save_pretrained(directory)
    drop = set(meta_tokens)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop(META_TOKENS_KEY, None)
    for key in SPECIAL_LIST_KEYS:
        if isinstance(config.get(key), list):
            config[key] = [t for t in config[key] if _content(t) not in drop]
    if isinstance(config.get("added_tokens_decoder"), dict):
        config["added_tokens_decoder"] = {i: t for i, t in config["added_tokens_decoder"].items()
                                          if _content(t) not in drop}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    fast_path = directory / "tokenizer.json"
    if fast_path.is_file():
        fast = json.loads(fast_path.read_text(encoding="utf-8"))
        fast["added_tokens"] = [t for t in fast.get("added_tokens", []) if t.get("content") not in drop]
        fast_path.write_text(json.dumps(fast, ensure_ascii=False) + "\n", encoding="utf-8")
    special_map = directory / "special_tokens_map.json"
    if special_map.is_file():
        tokens = json.loads(special_map.read_text(encoding="utf-8"))
        for key in SPECIAL_LIST_KEYS:
            if isinstance(tokens.get(key), list):
                tokens[key] = [t for t in tokens[key] if _content(t) not in drop]
        special_map.write_text(json.dumps(tokens, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _check_plain_tokenizer(tokenizer, directory, drop)


def _content(token: Any) -> Any:
    """A special token as its string (files list some as strings, some as {"content": ...})."""
    return token.get("content") if isinstance(token, dict) else token


def _check_plain_tokenizer(original, directory: Path, meta: set[str]) -> None:
    with quiet_transformers():
        plain = load_tokenizer(directory)
    left = sorted(meta & set(plain.get_vocab()))
    if left:
        raise QuietStarInputError(f"the exported tokenizer in {directory} still holds {left}: its files "
                                  f"({type(original).__name__}) keep the meta tokens where export_plain does "
                                  "not look; save the base model's own tokenizer there instead")
    for text in PROBES:
        if any(m in text for m in meta):
            continue  # the meta token's string is plain text now, tokenized into pieces
        before, after = (t(text, add_special_tokens=False).input_ids for t in (original, plain))
        if before != after:
            raise QuietStarInputError(f"the exported tokenizer in {directory} tokenizes {text!r} as "
                                      f"{after[:12]}, the model's as {before[:12]}; save the base model's "
                                      "own tokenizer there instead")


def render_distilled_card(lm, facts: DistillFacts) -> str:
    """The exported model's card: a plain causal LM, what it was distilled from and how."""
    meta: dict[str, Any] = {"pipeline_tag": "text-generation", "tags": ["quiet-star", "distillation", "causal-lm"]}
    if not facts.teacher.startswith(("/", ".")) and "/" in facts.teacher and not Path(facts.teacher).exists():
        meta["base_model"] = facts.teacher  # a Hub repo
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# Thought-free model distilled from {facts.teacher}", "",
             f"A plain {type(lm).__name__}: no thoughts, no mixing head, one decoder call per generated "
             "token, as the base model. "
             + (f"It was trained for {facts.steps} steps of {facts.tokens_per_step} tokens on "
                f"`{facts.data}` to match the next-token distribution of the Quiet-STaR model "
                f"`{facts.teacher}`, which thought {facts.thought_tokens} tokens at "
                f"{facts.thought_fraction:.0%} of the positions (its mixed prediction there, its base "
                f"prediction elsewhere): KL(teacher || this model) at temperature {facts.temperature}"
                + (f" plus {facts.next_token_loss_weight} x the next-token NLL"
                   if facts.next_token_loss_weight else "") + " (`quietstar distill`)."
                if facts.steps else
                f"It is the language model of the Quiet-STaR model `{facts.teacher}` as it is, without "
                "its thoughts (`quietstar distill --max-steps 0`)."), "",
             "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             "model = AutoModelForCausalLM.from_pretrained(\"<this folder or repo>\")",
             "tokenizer = AutoTokenizer.from_pretrained(\"<this folder or repo>\")",
             "ids = tokenizer(\"Q: 3 + 4 =\", return_tensors=\"pt\").input_ids",
             "print(tokenizer.decode(model.generate(ids, max_new_tokens=16)[0]))", "```", "",
             "The tokenizer is the teacher's without its two thought tokens; the embedding and output "
             "matrices have the base model's shape (the thought tokens never had rows of their own).", ""]
    return "\n".join(lines)
