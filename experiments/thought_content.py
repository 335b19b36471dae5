"""Does the content of the thoughts matter? A trained model with its own thoughts and two controls.

``evidence.py`` shows whether a Quiet-STaR model predicts better with thoughts than without. That
gain could come from what the thoughts say, or only from the extra computation and the mixing
head (a second prediction to blend with the first, whatever the thought). This script scores one
trained model on the held-out text of an evidence run three ways, thoughts from the same seeded
generator each time (``quietstar.evaluation.tasks.thoughts_for``):

  sampled   its own thoughts, as in the evidence run;
  random    uniform random tokens in place of the thought: no content, same head;
  shifted   its own thoughts, each moved to the position L/2 further on: fluent, but about
            another place in the text;

and compares them on the evidence run's primary token set, the hardest 10% of held-out tokens by
the untrained model's NLL (``--base-model``, default the embedded model), with paired bootstrap
CIs over documents. If ``sampled`` beats both controls, the content matters.

    python experiments/thought_content.py --model /path/to/trained/model \\
        --data ../shared/data/gsm8k/train.jsonl --heldout-documents 24 --out docs/results/my-content
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from quietstar.evaluation.analysis import token_nlls
from quietstar.data.corpora import heldout_split, load_texts
from quietstar.evaluation.tasks import THOUGHT_SOURCES
from quietstar.models.loading import EMBEDDED_MODEL, load_quietstar_model
from quietstar.evaluation.statistics import format_cell, summarize

from quietstar.evaluation.evidence import CONTENT_COMPARISONS as COMPARISONS
from quietstar.evaluation.evidence import token_nlls_without_thought, token_subsets, write_results


def measure(model, base_model, texts, max_length: int, batch_size: int, seed: int,
            think_at: str = "all") -> dict[str, np.ndarray]:
    """Per-token NLLs: the untrained model ("untrained"), the trained one without thoughts
    ("without") and with each thought source, thinking before every token (``think_at`` "all") or
    before the hardest 10% only ("hardest": their NLLs are the same, the others are not measured)."""
    nll = {}
    nll["untrained"], nll["document"] = token_nlls_without_thought(base_model, texts, max_length, batch_size)
    mask = None
    if think_at == "hardest":
        mask = np.zeros(nll["untrained"].size, dtype=bool)
        mask[token_subsets(nll["untrained"])["hardest"]] = True
    for source in THOUGHT_SOURCES:
        result = token_nlls(model, texts, max_length=max_length, batch_size=batch_size, seed=seed,
                            thought_source=source, progress=True, think_at=mask)
        nll[source], nll["without"] = result.thinking, result.base
        if not np.array_equal(result.document, nll["document"]):
            raise RuntimeError("the trained and untrained models cut the text into different tokens; "
                               "give the untrained model the trained one was made from (--base-model)")
    return nll


def compare(nll: dict[str, np.ndarray], seed: int = 0, think_at: str = "all") -> dict:
    untrained, document = nll["untrained"], nll["document"]
    subsets = token_subsets(untrained)
    if think_at == "hardest":  # the other tokens did not think
        subsets = {"hardest": subsets["hardest"]}
    arms = ("without",) + THOUGHT_SOURCES
    return {"n_tokens": int(untrained.size), "n_documents": int(np.unique(document).size),
            "nll": {s: {a: summarize(nll[a][i], document[i], seed) for a in arms} for s, i in subsets.items()},
            "difference": {s: {f"{a} - {b}": summarize(nll[a][i] - nll[b][i], document[i], seed)
                               for a, b in COMPARISONS} for s, i in subsets.items()}}


def tables(result: dict) -> str:
    n, d = result["nll"], result["difference"]
    subsets = [s for s in ("all", "hardest") if s in n]  # "all" only when every token thought
    names = {"all": "all tokens", "hardest": "hardest 10%"}
    rule = "|---" * (len(subsets) + 1) + "|"
    lines = [f"Held-out: {result['n_documents']} documents, {result['n_tokens']} tokens; hardest 10% by the "
             "untrained model's NLL. Mean [95% bootstrap CI over documents], nats/token.", "",
             "| thoughts | " + " | ".join(f"NLL, {names[s]}" for s in subsets) + " |", rule]
    lines += [f"| {a} | " + " | ".join(format_cell(n[s][a]) for s in subsets) + " |" for a in n["hardest"]]
    lines += ["", "Paired differences (negative = the first predicts better):", "",
              "| difference | " + " | ".join(names[s] for s in subsets) + " |", rule]
    lines += [f"| {a} - {b} | " + " | ".join(format_cell(d[s][f"{a} - {b}"], True) for s in subsets) + " |"
              for a, b in COMPARISONS]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained QuietStar model folder")
    p.add_argument("--base-model", default=EMBEDDED_MODEL, help="the untrained model it was trained from")
    p.add_argument("--data", required=True, help="the evidence run's --data")
    p.add_argument("--heldout-documents", type=int, default=60, help="the evidence run's --heldout-documents")
    p.add_argument("--eval-max-length", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the thoughts and the bootstrap (and, for builtin:arithmetic, the "
                        "documents, as in evidence.py): use the evidence run's --seed")
    p.add_argument("--think-at", choices=("all", "hardest"), default="all",
                   help="think before every token, or before the hardest 10%% only (the metric's "
                        "tokens: the same NLLs there, several times faster; all-token rows are then "
                        "not reported)")
    p.add_argument("--out", required=True, help="results folder")
    args = p.parse_args(argv)
    command = "python experiments/thought_content.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    texts, _ = heldout_split(load_texts(args.data, seed=args.seed), args.heldout_documents)  # evidence.py's cut
    model = load_quietstar_model(args.model).eval()
    base_model = load_quietstar_model(args.base_model).eval()
    nll = measure(model, base_model, texts, args.eval_max_length, args.eval_batch_size, args.seed,
                  args.think_at)
    result = compare(nll, args.seed, args.think_at) | {"command": command, "think_at": args.think_at}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "nll.npz", **nll)
    write_results(out, f"Thought content `{out.name}`", command, result, [tables(result)])
    print(tables(result))
    return result


if __name__ == "__main__":
    main()
