"""Pools evidence runs that differ only in their seed: does the configuration help on average?

One run of ``evidence.py`` answers for one seed (one data order, one draw of thoughts, one head
initialisation); its intervals resample held-out documents only, so they say nothing about how
much the result moves from seed to seed. This script takes several such runs (same model,
configuration and held-out text; ``--seed`` different) and reports, for the primary metric
(the hardest-10% held-out NLL differences ``quietstar_with - control`` and
``quietstar_with - quietstar_without``, see ``evidence.py``) and the context differences:

* every seed's mean difference, with its document-bootstrap CI (as in its own results.md);
* the seed-averaged difference, with a two-level bootstrap CI: each resample draws the seeds
  with replacement and, independently, the held-out documents with replacement (shared by all
  seeds: every run scored the same documents), so seed-to-seed variation counts as noise.

    python experiments/pool_seeds.py --out docs/results/pooled-seeds \\
        docs/results/run6-gsm8k-pw1-seed1 docs/results/run7-gsm8k-pw1-seed2 ...

writes ``results.md``, ``results.json`` and ``seeds.png`` (every seed's and the pooled difference,
95% CIs) into ``--out``. The runs must have scored the very same held-out tokens with the same
untrained model (checked: their ``nll_base.npz`` must be identical).

``thought_content.py`` results pool the same way (give their folders instead): own thoughts
against random and shifted ones, then against none, per seed and seed-averaged.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from quietstar.evaluation.statistics import format_cell, seed_summaries
from quietstar.evaluation.plots import new_figure, save_figure

from quietstar.evaluation.evidence import (COMPARISONS, CONTENT_COMPARISONS, arm_nlls, load_content_result,
                                same_tokens, shared_subsets, verdict, write_results)


def load_run(folder: Path) -> dict:
    """Per-token NLLs of one evidence run (as ``evidence.compare`` names them) or of one
    ``thought_content.py`` result (its thought sources; "base" = the untrained model), with
    "comparisons" (the run kind's) and "subsets" (only "hardest" where only those tokens thought)."""
    content = load_content_result(folder)
    if content is not None:
        return content | {"comparisons": CONTENT_COMPARISONS}
    files = {name: folder / f"nll_{name}.npz" for name in ("base", "control", "quietstar")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is neither a finished evidence run (missing {missing}: run "
                                "experiments/evidence.py to the end, or --reuse it) nor a "
                                "thought_content.py result (no nll.npz)")
    arms = {name: dict(np.load(path)) for name, path in files.items()}
    return arm_nlls(arms) | {"document": arms["base"]["document"], "comparisons": COMPARISONS,
                             "subsets": ("all", "hardest")}


def pool(runs: dict[str, dict[str, np.ndarray]], seed: int = 0) -> dict:
    """Per-seed and seed-averaged differences on the hardest 10% and on all tokens."""
    names = list(runs)
    first = runs[names[0]]
    for name in names[1:]:
        if runs[name]["comparisons"] != first["comparisons"]:
            raise ValueError(f"{name} and {names[0]} are not the same kind of run: pool evidence runs "
                             "with evidence runs and thought_content.py results with their like")
        if not same_tokens(runs[name], first):
            raise ValueError(f"{name} did not score the same held-out tokens as {names[0]} (their "
                             "untrained-model NLLs differ): pool only runs with the same model, "
                             "data and --heldout-documents")
    base, documents, comparisons = first["base"], first["document"], first["comparisons"]
    subsets = shared_subsets(base, runs.values())
    result = {"runs": names, "n_tokens": int(base.size), "comparisons": [list(c) for c in comparisons],
              "n_documents": int(np.unique(documents).size), "per_seed": {}, "pooled": {}}
    for subset, index in subsets.items():
        result["per_seed"][subset], result["pooled"][subset] = {}, {}
        for a, b in comparisons:
            key = f"{a} - {b}"
            diffs = np.stack([runs[n][a][index] - runs[n][b][index] for n in names])
            summary = seed_summaries(diffs, documents[index], seed)
            result["per_seed"][subset][key], result["pooled"][subset][key] = summary["per_seed"], summary["pooled"]
    return result


def tables(result: dict) -> str:
    names, comparisons = result["runs"], [tuple(c) for c in result["comparisons"]]
    hardest = result["per_seed"]["hardest"]
    lines = [f"Held-out: {result['n_documents']} documents, {result['n_tokens']} tokens; hardest 10% = "
             f"{hardest[f'{comparisons[0][0]} - {comparisons[0][1]}'][0]['n']} tokens. Differences in "
             "nats/token, mean [95% CI]; negative = the first arm predicts better.", "",
             "Hardest 10%, every seed (CI over documents) and pooled (CI over seeds and documents):", "",
             "| run | " + " | ".join(f"{a} - {b}" for a, b in comparisons) + " |",
             "|---|" + "---|" * len(comparisons)]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(format_cell(hardest[f'{a} - {b}'][i], True)
                                                for a, b in comparisons) + " |")
    for subset, label in (("hardest", "**pooled, hardest 10%**"), ("all", "pooled, all tokens")):
        if subset not in result["pooled"]:
            continue
        lines.append(f"| {label} | " + " | ".join(format_cell(result["pooled"][subset][f"{a} - {b}"], True)
                                                 for a, b in comparisons) + " |")
    lines += ["", "The first two differences, pooled over the seeds:", ""]
    for a, b in comparisons[:2]:
        s = result["pooled"]["hardest"][f"{a} - {b}"]
        lines.append(f"* `{a} - {b}`: {format_cell(s, True)}: {verdict(s)}")
    return "\n".join(lines)


def plot_seeds(result: dict, path: Path) -> None:
    """The two primary differences of every seed and pooled, with their 95% CIs."""
    comparisons = [tuple(c) for c in result["comparisons"]]
    fig, ax = new_figure(8, 4.2)
    ax.axvline(0.0, color="0.4", linewidth=1)
    names = result["runs"] + ["pooled"]
    for (a, b), color, shift in zip(comparisons[:2], ("tab:blue", "tab:orange"), (-0.12, 0.12)):
        key = f"{a} - {b}"
        stats = result["per_seed"]["hardest"][key] + [result["pooled"]["hardest"][key]]
        y = np.arange(len(names)) + shift
        x = np.array([s["mean"] for s in stats])
        err = [x - [s["ci_low"] for s in stats], [s["ci_high"] for s in stats] - x]
        ax.errorbar(x, y, xerr=err, fmt="o", capsize=3, color=color, label=key)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("hardest-10% NLL difference (nats/token; < 0: thinking better)")
    ax.set_title("Per seed (CI over documents) and pooled (CI over seeds and documents)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="evidence run folders, or thought_content.py result "
                                           "folders (same configuration, other seeds)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("pooling needs at least two runs")
    command = "python experiments/pool_seeds.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    names = [Path(r).name for r in args.runs]
    if len(set(names)) < len(names):  # e.g. RUN/thought-content folders: name them by their run
        names = [f"{Path(r).parent.name}/{Path(r).name}" for r in args.runs]
    if len(set(names)) < len(names):
        p.error(f"the runs must be different folders, got {args.runs}")
    runs = {name: load_run(Path(r)) for name, r in zip(names, args.runs)}
    result = pool(runs, args.seed) | {"command": command}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_seeds(result, out / "seeds.png")
    write_results(out, f"Pooled evidence runs `{out.name}`", command, result,
                  [tables(result), "", "![seeds](seeds.png)"])
    print(tables(result))
    return result


if __name__ == "__main__":
    main()
