"""Successors' evidence: continued pretraining, Quiet-STaR, RLP and RPT at equal wall time.

Four arms train the embedded SmolLM2-135M on GSM8K text from the same start, with the same
optimiser, schedule, batches (seq 64, batch 1) and held-out cut; each gets the same wall time,
as a step count fixed in advance from a timing run (``time``):

    cp          plain continued pretraining (next-token NLL, no thoughts)
    quietstar   the best Quiet-STaR configuration so far (run 5 + ``thought_loss_weight`` 0.1)
    rlp         ``objective="rlp"`` (the rlp preset's method settings, k = ``--thought-tokens``)
    rpt         ``objective="rpt"`` (the rpt preset's method settings, k = ``--thought-tokens``)

Each trained arm is measured (``run``) on the first ``NLL_DOCUMENTS`` held-out documents, token
by token: the untrained model's NLL (which ranks the hardest 10%), the arm's NLL without a
thought and, for a thinking arm, before each of the hardest 10% with its own thought, a uniform
random one and its own thought from L/2 further on (``thought_content.measure``, the same
thoughts everywhere else); the direct GSM8K score of the 200 held-out questions (without and,
for a thinking arm, with thoughts); thought health on the NLL documents (leak rate, distinct
thoughts, reward spread). ``report`` pools the seeds per arm with the two-level bootstrap (seeds
and documents resampled) and writes results.md / results.json.

    python experiments/successors.py time --arm rlp --thought-tokens 64
    python experiments/successors.py run --arm rlp --seed 9 --steps 20 --thought-tokens 64 --out DIR
    python experiments/successors.py report --out RESULTS DIR...
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evidence import check_disjoint, train_control
from thought_content import measure as content_nlls

from quietstar.data.corpora import heldout_split, load_texts
from quietstar.evaluation.analysis import thought_health_report
from quietstar.evaluation.evidence import token_nlls_without_thought, token_subsets, write_results
from quietstar.evaluation.statistics import format_cell, seed_summaries
from quietstar.evaluation.tasks import direct_scores, load_items
from quietstar.method.config import QuietStarConfig
from quietstar.models.loading import EMBEDDED_MODEL, load_quietstar_model
from quietstar.models.modeling import QuietStarForCausalLM
from quietstar.training.checkpoint import MODEL_DIR
from quietstar.training.config import TrainConfig
from quietstar.training.recipe import train

DATA = "../shared/data/gsm8k/train.jsonl"
HELDOUT_DOCUMENTS = 200   # the direct-score questions, never trained on
NLL_DOCUMENTS = 24        # runs 1-9's and the three content attempts' held-out NLL set
EVAL_MAX_LENGTH, EVAL_BATCH_SIZE = 128, 4
THINKING = ("quietstar", "rlp", "rpt")


def method_settings(arm: str, thought_tokens: int) -> dict:
    """The QuietStarConfig of each thinking arm (cp trains the plain LM, no method settings)."""
    if arm == "quietstar":  # attempt 3 of the content tests: run 5's flags + the post-thought NLL
        return dict(sampled_thought_tokens=4, ahead_tokens=4, thoughts_per_position=2, policy_loss_weight=1.0,
                    base_loss_weight=1.0, mixed_loss_weight=1.0, thought_loss_weight=0.1)
    common = dict(thoughts_per_position=4, sampled_thought_tokens=thought_tokens, thought_count=2,
                  next_token_loss_weight=0.0)
    if arm == "rlp":  # the rlp preset's method settings
        return common | dict(objective="rlp", ahead_tokens=1, thought_temperature=0.7, thought_selection="random")
    return common | dict(objective="rpt", ahead_tokens=2, thought_selection="entropy")  # the rpt preset's


def train_config(arm: str, seed: int, steps: int, thought_tokens: int, out: Path) -> TrainConfig:
    """Every arm's optimiser, schedule, batches and held-out cut are the same; only the method and
    the step count differ."""
    method = QuietStarConfig(**method_settings("quietstar" if arm == "cp" else arm, thought_tokens))
    return TrainConfig(
        model=EMBEDDED_MODEL, data=DATA, output_dir=str(out), seq_len=64, batch_size=1, micro_batch_size=1,
        max_steps=steps, learning_rate=3e-5, warmup_steps=3, seed=seed,
        mixing_head_lr_multiplier=30.0 if arm == "quietstar" else 1.0,
        eval_every=steps, eval_batches=1, eval_documents=HELDOUT_DOCUMENTS,
        sample_every=max(1, steps // 5), checkpoint_every=steps, keep_checkpoints=1, quietstar=method)


def train_arm(config: TrainConfig, arm: str) -> QuietStarForCausalLM:
    if arm == "cp":
        return train_control(config)
    checkpoint = train(config).checkpoint
    return QuietStarForCausalLM.from_pretrained(checkpoint / MODEL_DIR).eval()


def step_times(folder: Path) -> list[float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in records if "step_time_s" in r]


# ----------------------------------------------------------------------------- stages
def time_arm(args) -> None:
    """Seconds per step of one arm: the median of steps 2..N of a short run (step 1 warms up)."""
    out = Path(args.out or f"/tmp/successors-time-{args.arm}-k{args.thought_tokens}")
    config = train_config(args.arm, 0, args.steps, args.thought_tokens, out)
    config.eval_every = config.checkpoint_every = 10**6  # timing only: no evaluation, no checkpoint
    started = time.perf_counter()
    train_arm(config, args.arm)
    times = step_times(out)
    print(json.dumps({"arm": args.arm, "thought_tokens": args.thought_tokens, "steps": times,
                      "median_s": statistics.median(times[1:]), "wall_s": time.perf_counter() - started}))


def run_arm(args) -> None:
    """Train one arm at one seed, then measure it; everything lands in ``--out``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/successors.py " + shlex.join(sys.argv[1:])
    config = train_config(args.arm, args.seed, args.steps, args.thought_tokens, out / "train")
    heldout, train_texts = heldout_split(load_texts(DATA, seed=args.seed), HELDOUT_DOCUMENTS)
    questions = load_items("gsm8k", DATA, limit=8 if args.quick else HELDOUT_DOCUMENTS)
    check_disjoint(train_texts, heldout, {"gsm8k": questions})
    texts = heldout[:2 if args.quick else NLL_DOCUMENTS]

    started = time.perf_counter()
    model = train_arm(config, args.arm)
    train_s = time.perf_counter() - started
    base_model = load_quietstar_model(EMBEDDED_MODEL).eval()
    if args.arm == "cp":
        nll = {}
        nll["untrained"], nll["document"] = token_nlls_without_thought(base_model, texts, EVAL_MAX_LENGTH,
                                                                        EVAL_BATCH_SIZE)
        nll["without"], _ = token_nlls_without_thought(model, texts, EVAL_MAX_LENGTH, EVAL_BATCH_SIZE)
    else:
        nll = content_nlls(model, base_model, texts, EVAL_MAX_LENGTH, EVAL_BATCH_SIZE, args.seed, "hardest")
    scores = {"gsm8k_without": direct_scores(model, questions, "gsm8k", 0, batch_size=8)}
    if args.arm != "cp" and args.direct_with_thoughts:
        generator = torch.Generator().manual_seed(args.seed)
        scores["gsm8k_with"] = direct_scores(model, questions, "gsm8k", model.config.sampled_thought_tokens,
                                             batch_size=8, generator=generator)
    health = None
    if args.arm != "cp" and args.health:
        health = thought_health_report(model, texts, EVAL_MAX_LENGTH, EVAL_BATCH_SIZE, args.seed)
    np.savez(out / "measured.npz", **nll, **scores)
    times = step_times(out / "train")
    summary = {"arm": args.arm, "seed": args.seed, "steps": args.steps, "quick": args.quick, "command": command,
               "train_s": train_s, "median_step_s": statistics.median(times), "measure_s":
               time.perf_counter() - started - train_s, "health": health, "config": config.to_dict()}
    (out / "run.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))


# ----------------------------------------------------------------------------- report
def training_health(folders: list[Path]) -> dict | None:
    """The training log's thought health, mean over every step of every run (None: not logged)."""
    records = [json.loads(line) for folder in folders for line in (folder / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "leak_rate" in r]
    if not records:
        return None
    keys = [k for k in ("leak_rate", "distinct_thoughts", "reward_spread", "mean_reward") if k in records[0]]
    return {k: float(np.mean([r[k] for r in records])) for k in keys}


def report(args) -> None:
    out = Path(args.out)
    runs: dict[str, list[dict]] = {}
    for folder in map(Path, args.runs):
        meta = json.loads((folder / "run.json").read_text()) | {"out": str(folder)}
        runs.setdefault(meta["arm"], []).append(dict(np.load(folder / "measured.npz")) | {"meta": meta})
    for arm in runs:
        runs[arm].sort(key=lambda r: r["meta"]["seed"])
    cp_by_seed = {r["meta"]["seed"]: r for r in runs["cp"]}
    seeds = sorted(cp_by_seed)
    untrained = runs["cp"][0]["untrained"]
    hardest = token_subsets(untrained)["hardest"]
    for arm, rs in runs.items():
        missing = [r["meta"]["seed"] for r in rs if r["meta"]["seed"] not in cp_by_seed]
        if missing:
            raise ValueError(f"arm {arm} has seeds {missing} that cp lacks: every difference pairs runs of one seed")
        for r in rs:
            if not np.array_equal(r["untrained"], untrained):
                raise ValueError(f"arm {arm} seed {r['meta']['seed']} scored other held-out tokens")
    questions = np.arange(runs["cp"][0]["gsm8k_without"].size)
    result = {"seeds": seeds, "hardest_tokens": int(hardest.size), "tokens": int(untrained.size), "arms": {}}
    for arm, rs in runs.items():
        cp = [cp_by_seed[r["meta"]["seed"]] for r in rs]  # each run beside cp of its seed
        cells = {}
        def diff(label, first, second, index=hardest, doc=None):
            diffs = np.stack([f[index] - s[index] for f, s in zip(first, second)])
            cells[label] = seed_summaries(diffs, cp[0]["document"][index] if doc is None else doc)
        without = [r["without"] for r in rs]
        diff("without - cp", without, [r["without"] for r in cp])
        if arm != "cp":
            own = [r["sampled"] for r in rs]
            diff("own - cp", own, [r["without"] for r in cp])
            diff("own - shifted", own, [r["shifted"] for r in rs])
            diff("own - random", own, [r["random"] for r in rs])
            diff("own - without", own, without)
            measured = [(r, c) for r, c in zip(rs, cp) if "gsm8k_with" in r]  # skipped at some seeds for time
            if measured:
                diff("direct with - cp", [r["gsm8k_with"] for r, _ in measured],
                     [c["gsm8k_without"] for _, c in measured], index=questions, doc=questions)
        diff("direct without - cp", [r["gsm8k_without"] for r in rs], [r["gsm8k_without"] for r in cp],
             index=questions, doc=questions)
        health = [r["meta"]["health"] for r in rs if r["meta"]["health"]]
        result["arms"][arm] = {
            "seeds": [r["meta"]["seed"] for r in rs],
            "steps": rs[0]["meta"]["steps"],
            "train_s": [round(r["meta"]["train_s"]) for r in rs],
            "hardest_without": float(np.mean([r["without"][hardest].mean() for r in rs])),
            "direct_without": float(np.mean([r["gsm8k_without"].mean() for r in rs])),
            "health": {k: float(np.mean([h[k] for h in health])) for k in health[0]} if health else None,
            "health_seeds": [r["meta"]["seed"] for r in rs if r["meta"]["health"]],
            "training_health": training_health([Path(r["meta"]["out"]) / "train" for r in rs]),
            "differences": {k: v["pooled"] for k, v in cells.items()},
            "per_seed": {k: v["per_seed"] for k, v in cells.items()}}
        if arm != "cp":
            result["arms"][arm]["hardest_own"] = float(np.mean([r["sampled"][hardest].mean() for r in rs]))
            with_ = [r for r in rs if "gsm8k_with" in r]
            if with_:
                result["arms"][arm]["direct_with"] = float(np.mean([r["gsm8k_with"].mean() for r in with_]))
                result["arms"][arm]["direct_with_seeds"] = [r["meta"]["seed"] for r in with_]
    for arm, cells in result["arms"].items():
        d = cells["differences"]
        cells["bar"] = arm != "cp" and all(d[k]["ci_high"] < 0 for k in ("own - cp", "own - shifted", "own - random"))
    result["bar_met_by"] = [arm for arm, cells in result["arms"].items() if cells["bar"]]
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/successors.py " + shlex.join(sys.argv[1:])
    write_results(out, "Successors at equal wall time", command, result, [tables(result)])
    print(tables(result))


def tables(result: dict) -> str:
    keys = ("own - cp", "own - shifted", "own - random", "own - without", "without - cp")
    lines = [f"Seeds {result['seeds']}; hardest 10% = {result['hardest_tokens']} of {result['tokens']} "
             "held-out tokens. Differences in nats/token, seed-averaged mean [95% CI over seeds and "
             "documents]; negative = the first predicts better.", "",
             "| arm | seeds | steps | training s (per seed) | hardest-10% NLL (own / without) | " + " | ".join(keys)
             + " | bar |", "|---|---|---|---|---|" + "---|" * len(keys) + "---|"]
    for arm, c in result["arms"].items():
        d = c["differences"]
        nll = (f"{c['hardest_own']:.3f}" if "hardest_own" in c else "-") + f" / {c['hardest_without']:.3f}"
        seconds = ", ".join(str(t) for t in c["train_s"])
        lines.append(f"| {arm} | {', '.join(map(str, c['seeds']))} | {c['steps']} | {seconds} | {nll} | " + " | ".join(
            format_cell(d[k], True) if k in d else "" for k in keys) + f" | {'met' if c['bar'] else 'not met'} |")
    lines += ["", "Direct GSM8K score of the 200 held-out questions (with thoughts: the seeds listed); thought "
              "health on the held-out documents (the seeds listed) and in the training log (every step, every seed).", "",
              "| arm | direct GSM8K (with / without) | with - cp | without - cp | held-out leak rate | distinct | "
              "reward spread | training leak rate | training mean reward |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, c in result["arms"].items():
        d, h, train_health = c["differences"], c["health"] or {}, c["training_health"] or {}
        with_ = f"{c['direct_with']:.5f} (seeds {c['direct_with_seeds']})" if "direct_with" in c else "-"
        lines.append(f"| {arm} | {with_} / {c['direct_without']:.5f} | "
                     f"{format_cell(d['direct with - cp'], True, 5) if 'direct with - cp' in d else ''} | "
                     f"{format_cell(d['direct without - cp'], True, 5)} | "
                     + " | ".join(f"{h[k]:.3f}" if k in h else "" for k in ("leak_rate", "distinct_thoughts",
                                                                          "reward_spread"))
                     + f" | {train_health.get('leak_rate', float('nan')):.3f} | "
                       f"{train_health.get('mean_reward', float('nan')):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    for name in ("time", "run"):
        s = sub.add_parser(name)
        s.add_argument("--arm", choices=("cp",) + THINKING, required=True)
        s.add_argument("--thought-tokens", type=int, default=64, help="k of the rlp and rpt arms")
        s.add_argument("--steps", type=int, default=4)
        s.add_argument("--out", default=None, required=name == "run")
        if name == "run":
            s.add_argument("--seed", type=int, required=True)
            s.add_argument("--no-direct-with-thoughts", dest="direct_with_thoughts", action="store_false",
                           help="skip the direct score with thoughts (the costliest measurement with long thoughts)")
            s.add_argument("--no-health", dest="health", action="store_false",
                           help="skip the held-out thought health (leak rate etc.; the training log has it for rlp / rpt)")
            s.add_argument("--quick", action="store_true",
                           help="measure on 2 documents and 8 questions: a check of the pipeline, not a result")
    s = sub.add_parser("report")
    s.add_argument("--out", required=True)
    s.add_argument("runs", nargs="+")
    args = p.parse_args(argv)
    {"time": time_arm, "run": run_arm, "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
