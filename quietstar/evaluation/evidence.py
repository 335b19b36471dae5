"""The evidence experiment's shared definitions (``experiments/evidence.py`` runs it;
``pool_seeds.py`` and ``thought_content.py`` read its runs): the arms, the comparisons fixed in
advance, the hardest-token subset, per-token NLLs without thoughts, and how a difference reads.

Arms: 1. Quiet-STaR training, measured with its thoughts and without (its own base prediction);
2. continued pretraining of the same model on the same batches (the control); 3. the untrained
base model. docs/results/README.md reports them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from quietstar.evaluation.analysis import token_nlls

ARMS = ("quietstar_with", "quietstar_without", "control", "base")
LABELS = {"quietstar_with": "1. Quiet-STaR, with thoughts",
          "quietstar_without": "1. Quiet-STaR, without thoughts",
          "control": "2. continued pretraining (no thoughts)",
          "base": "3. untrained base model"}
# The two comparisons the experiment is about (primary), then context.
COMPARISONS = (("quietstar_with", "control"), ("quietstar_with", "quietstar_without"),
               ("quietstar_with", "base"), ("control", "base"), ("quietstar_without", "base"))
# ``thought_content.py``: own ("sampled") thoughts against the controls, then against none.
CONTENT_COMPARISONS = (("sampled", "random"), ("sampled", "shifted"), ("sampled", "without"),
                       ("random", "without"), ("shifted", "without"))
HARDEST_FRACTION = 0.1


def arm_nlls(arms: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The per-token NLLs of ``ARMS`` from the measured arms (``nll_<arm>.npz`` contents)."""
    return {"quietstar_with": arms["quietstar"]["nll_with"],
            "quietstar_without": arms["quietstar"]["nll_without"],
            "control": arms["control"]["nll_without"], "base": arms["base"]["nll_without"]}


def token_subsets(base: np.ndarray) -> dict[str, np.ndarray]:
    """Token indices: "all" (easiest first, by the untrained model's NLL ``base``) and "hardest",
    the top ``HARDEST_FRACTION`` of them."""
    order = np.argsort(base, kind="stable")
    return {"all": order, "hardest": order[-math.ceil(HARDEST_FRACTION * base.size):]}


def verdict(s: dict) -> str:
    """How a difference "thinking - other" reads from its 95% interval."""
    if s["ci_high"] < 0:
        return "thinking better (CI < 0)"
    if s["ci_low"] > 0:
        return "thinking worse (CI > 0)"
    return "no difference shown (CI spans 0)"


def token_nlls_without_thought(model, texts, max_length: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(NLL, document) of every token of ``texts``, no thoughts, in ``analysis.token_nlls``' order."""
    nll = token_nlls(model, texts, thought_tokens=0, max_length=max_length, batch_size=batch_size)
    return nll.base, nll.document


def load_content_result(folder) -> dict | None:
    """A ``thought_content.py`` result folder (``nll.npz``, ``results.json``) as its per-token NLLs
    ("untrained" also as "base", "document", "without" and each thought source) plus "subsets": the token sets
    on which every source thought (only "hardest" for ``--think-at hardest``). None if ``folder``
    holds no such result."""
    folder = Path(folder)
    if not (folder / "nll.npz").exists():
        return None
    nll = dict(np.load(folder / "nll.npz"))
    settings = json.loads((folder / "results.json").read_text())
    return nll | {"base": nll["untrained"],
                  "subsets": ("hardest",) if settings.get("think_at") == "hardest" else ("all", "hardest")}


def same_tokens(a: dict, b: dict) -> bool:
    """Whether two loaded results scored the same held-out tokens: the same untrained-model NLLs
    ("base") of the same documents."""
    return np.array_equal(a["base"], b["base"]) and np.array_equal(a["document"], b["document"])


def shared_subsets(base: np.ndarray, results) -> dict[str, np.ndarray]:
    """``token_subsets(base)`` restricted to the subsets on which every one of ``results`` (each
    with "subsets", as ``load_content_result`` gives) thought."""
    return {s: i for s, i in token_subsets(base).items() if all(s in r["subsets"] for r in results)}


def write_results(out, title: str, command: str, result: dict, body: list[str]) -> None:
    """An experiment's report into the folder ``out``: ``results.json`` (``result``) and
    ``results.md`` (``title``, the command that made it, then the ``body`` lines)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n".join([f"# {title}", "", "Command (from the repository root):", "",
                      f"```\n{command}\n```", "", *body, ""])
    (out / "results.md").write_text(text, encoding="utf-8")
