"""The model card (``README.md`` with the Hugging Face Hub's metadata header) of a saved model.

``save_pretrained`` writes it; a training run adds what only it knows (``TrainingFacts``): the
data, the steps, the held-out figures and a few sampled thoughts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

CARD_NAME = "README.md"


@dataclass
class TrainingFacts:
    """What a training run knows about the model it saves."""

    data: str
    steps: int
    tokens_per_step: int
    heldout: dict[str, float] = field(default_factory=dict)  # eval/nll_with_thought, ... at the end
    samples: list[str] = field(default_factory=list)          # sampled thoughts, formatted


def base_model_name(lm) -> str | None:
    """The base model's Hub id or folder, as transformers recorded it when loading."""
    name = getattr(lm.config, "_name_or_path", None) or getattr(lm, "name_or_path", None)
    return str(name) if name else None


def render_card(model, facts: TrainingFacts | None = None) -> str:
    cfg = model.config
    base = base_model_name(model.lm)
    meta: dict[str, Any] = {"library_name": "quietstar", "pipeline_tag": "text-generation",
                            "tags": ["quiet-star", "thinking", "causal-lm"]}
    if base and not base.startswith(("/", ".")):
        meta["base_model"] = base
    if facts is not None and not facts.data.startswith(("/", ".", "builtin:")):  # a Hub dataset
        meta["datasets"] = [facts.data]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# Quiet-STaR model{f' from {base}' if base else ''}", "",
             "A causal LM that thinks before it speaks, by the method of \"Quiet-STaR: Language Models "
             "Can Teach Themselves to Think Before Speaking\" (Zelikman et al., 2024), made with the "
             "quietstar library" + (" (see Training below)" if facts else " (not trained yet: its mixing "
             "weight is 0, so its thoughts change nothing)") + ". After every token it samples a "
             f"thought of {cfg.sampled_thought_tokens} tokens between `{cfg.start_thought_token}` and "
             f"`{cfg.end_thought_token}`; a mixing head blends the prediction after the thought with the "
             "one without.", "",
             "## Use", "", "```python", "from quietstar import QuietStarForCausalLM", "",
             "model = QuietStarForCausalLM.from_pretrained(\"<this folder or repo>\")",
             "ids = model.tokenizer(\"Q: 3 + 4 =\", return_tensors=\"pt\").input_ids",
             "out = model.generate(ids, max_new_tokens=16, return_thoughts=True)",
             "print(model.tokenizer.decode(out.sequences[0]), out.thoughts[0])", "```", "",
             "Loaded with `transformers.AutoModelForCausalLM` instead, the folder is the base LM with "
             "two extra tokens in its tokenizer and no thinking: the mixing head and the learned "
             "START/END embeddings live in `quietstar_head.safetensors`, which only quietstar reads.", "",
             "## Method settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in cfg.to_dict().items()]
    if facts is not None:
        lines += ["", "## Training", "", f"- data: `{facts.data}`",
                  f"- optimiser steps: {facts.steps} of {facts.tokens_per_step} tokens"]
        if facts.heldout:
            lines += ["", "Held-out NLL (nats/token) at the end of training:", "",
                      "| measure | value |", "|---|---|"]
            lines += [f"| {k.removeprefix('eval/')} | {v:.4f} |" for k, v in facts.heldout.items()]
        if facts.samples:
            lines += ["", "Sampled thoughts (`…text «thought» next tokens`):", ""]
            lines += [f"- {s}" for s in facts.samples]
    return "\n".join(lines) + "\n"
