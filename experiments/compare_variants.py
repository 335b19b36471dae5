"""Compares trained variants of one configuration, seed by seed: which variant predicts better?

Each variant (e.g. ``thought_fraction`` 0.25 by entropy, 1.0, 0.25 at random) is trained at the
same seeds and scored by ``thought_content.py`` on the same held-out text. This script pairs the
variants' results seed by seed (the i-th folder of each variant) and reports, on the hardest 10%
of tokens (by the untrained model's NLL; all tokens too where every token thought):

* every variant's gain from its own thoughts, ``with - without``;
* the first variant against each other one: ``with`` (the NLL after its own thoughts: the LM and
  the thoughts together) and ``without`` (the LM alone), first minus other;

per seed (95% bootstrap CI over documents) and seed-averaged (the two-level bootstrap of
``pool_seeds.py``: seeds and documents resampled). Negative = the first predicts better.

    python experiments/compare_variants.py --out docs/results/selective-pooled \\
        --variant E docs/results/content-seed0/thought-content docs/results/content-seed1/thought-content \\
        --variant F docs/results/selective-F-seed0/thought-content docs/results/selective-F-seed1/thought-content

writes ``results.md`` and ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from quietstar.evaluation.evidence import load_content_result, same_tokens, shared_subsets, write_results
from quietstar.evaluation.statistics import format_cell, seed_summaries


def load_variants(variants: list[list[str]]) -> dict[str, list[dict]]:
    """{name: [seed results]} from ``--variant NAME DIR ...`` lists, checked comparable."""
    loaded = {}
    for name, *folders in variants:
        if not folders:
            raise ValueError(f"--variant {name}: give its thought_content.py result folders, one per seed")
        if name in loaded:
            raise ValueError(f"--variant {name} is given twice")
        results = [load_content_result(f) for f in folders]
        missing = [f for f, r in zip(folders, results) if r is None]
        if missing:
            raise FileNotFoundError(f"--variant {name}: {missing} hold no thought_content.py result (nll.npz)")
        loaded[name] = results
    seeds = {len(r) for r in loaded.values()}
    if len(loaded) < 2 or len(seeds) != 1:
        raise ValueError("give at least two variants with the same number of folders (one per seed, in "
                         f"the same seed order); got {({n: len(r) for n, r in loaded.items()})}")
    first = next(iter(loaded.values()))[0]
    for name, results in loaded.items():
        for r in results:
            if not same_tokens(r, first):
                raise ValueError(f"--variant {name}: a folder scored other held-out tokens than the "
                                 "first; compare results of one --data and --heldout-documents")
    return loaded


def compare(loaded: dict[str, list[dict]], seed: int = 0) -> dict:
    names = list(loaded)
    first = loaded[names[0]][0]
    subsets = shared_subsets(first["base"], [r for rs in loaded.values() for r in rs])
    document = first["document"]
    rows = {f"{n}: with - without": [(r["sampled"], r["without"]) for r in loaded[n]] for n in names}
    for other in names[1:]:
        for kind in ("with", "without"):
            key = "sampled" if kind == "with" else "without"
            rows[f"{names[0]} - {other}, {kind}"] = [(a[key], b[key]) for a, b in zip(loaded[names[0]], loaded[other])]
    result = {"variants": names, "seeds": len(loaded[names[0]]), "n_tokens": int(document.size),
              "n_documents": int(np.unique(document).size), "differences": {}}
    for subset, index in subsets.items():
        result["differences"][subset] = {
            row: seed_summaries(np.stack([a[index] - b[index] for a, b in pairs]), document[index], seed)
            for row, pairs in rows.items()}
    return result


def tables(result: dict) -> str:
    lines = [f"Held-out: {result['n_documents']} documents, {result['n_tokens']} tokens; variants "
             f"{', '.join(result['variants'])}, {result['seeds']} seeds each. NLL differences in nats/token, "
             "mean [95% CI]; negative = the first predicts better. `with` = after the variant's own "
             "thoughts, `without` = its language model alone. Seed #i is the i-th folder of each variant:"]
    lines += [""] + [f"* {name}: " + ", ".join(f"`{f}`" for f in folders)
                     for name, folders in result.get("folders", {}).items()]
    for subset, label in (("hardest", "Hardest 10%"), ("all", "All tokens")):
        if subset not in result["differences"]:
            continue
        lines += ["", f"{label}, every seed (CI over documents) and pooled (CI over seeds and documents):", "",
                  "| difference | " + " | ".join(f"seed #{i}" for i in range(result["seeds"])) + " | **pooled** |",
                  "|---|" + "---|" * (result["seeds"] + 1)]
        for row, s in result["differences"][subset].items():
            lines.append(f"| {row} | " + " | ".join(format_cell(c, True) for c in s["per_seed"])
                         + f" | **{format_cell(s['pooled'], True)}** |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "DIR"),
                   help="a variant's name, then its thought_content.py result folders in seed order "
                        "(repeat for each variant; the first is compared against the others)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = p.parse_args(argv)
    command = "python experiments/compare_variants.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = compare(load_variants(args.variant), args.seed) | {
        "command": command, "folders": {name: folders for name, *folders in args.variant}}
    write_results(args.out, f"Variants compared `{Path(args.out).name}`", command, result, [tables(result)])
    print(tables(result))
    return result


if __name__ == "__main__":
    main()
