"""Distillation's evidence: a thinking model distilled into a plain one, against continued
pretraining with the same total compute (the teacher's training counted).

Three arms per seed train the embedded SmolLM2-135M on GSM8K text, with the successors' held-out
cut, optimiser and batches (seq 64, batch 1, lr 3e-5, warm-up 3; ``successors.train_config``):

    teacher     Quiet-STaR, the successors' quietstar arm (k = 4), for 480 s
    distilled   ``quietstar distill`` of that teacher: its LM (the student) matches the teacher's
                mixed next-token distribution, the teacher thinking at every position (T^2 KL,
                T = 1, no next-token loss), for 480 s; measured as the exported plain
                Hugging Face folder
    cp          plain continued pretraining (next-token NLL) for 960 s (teacher + distillation)

Seconds are step counts fixed in advance from a timing run (``time``: the median of steps
2..N). Each arm is measured (``run``) on the first ``NLL_DOCUMENTS`` held-out documents, token by
token: the untrained model's NLL (which ranks the hardest 10%) and the arm's NLL without a
thought; the teacher also with its own thoughts before every token (the distribution it
taught). ``report`` pairs the arms of each seed and pools the seeds with the two-level bootstrap
(seeds and documents resampled), on the hardest 10% and on every token.

    python experiments/distillation.py time --arm distilled --steps 6
    python experiments/distillation.py run --arm teacher --seed 12 --steps 25 --out DIR/teacher-seed12
    python experiments/distillation.py run --arm distilled --seed 12 --steps 100 --teacher DIR/teacher-seed12 \\
        --out DIR/distilled-seed12
    python experiments/distillation.py report --out RESULTS DIR/*-seed*
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evidence import check_disjoint
from successors import DATA, EVAL_BATCH_SIZE, EVAL_MAX_LENGTH, HELDOUT_DOCUMENTS, NLL_DOCUMENTS
from successors import step_times, train_arm, train_config

from quietstar.data.corpora import heldout_split, load_texts
from quietstar.evaluation.analysis import token_nlls
from quietstar.evaluation.evidence import token_nlls_without_thought, token_subsets, write_results
from quietstar.evaluation.statistics import format_cell, seed_summaries
from quietstar.models.loading import EMBEDDED_MODEL, load_quietstar_model
from quietstar.training.checkpoint import MODEL_DIR
from quietstar.training.components import build_model
from quietstar.training.distill import distill
from quietstar.training.distill_config import DistillConfig

ARMS = ("teacher", "distilled", "cp")
TEACHER_THOUGHT_TOKENS = 4  # the successors' quietstar arm


def distill_config(seed: int, steps: int, teacher: Path, data: Path, out: Path) -> DistillConfig:
    """The distilled arm's settings: the other arms' optimiser, schedule and batch shape."""
    return DistillConfig(teacher=str(teacher), data=str(data), output_dir=str(out), seq_len=64, batch_size=1,
                         max_steps=steps, learning_rate=3e-5, warmup_steps=3, seed=seed, temperature=1.0,
                         next_token_loss_weight=0.0, thought_fraction=1.0, checkpoint_every=max(1, steps),
                         keep_checkpoints=1)


def write_training_texts(seed: int, path: Path) -> list[str]:
    """The documents every arm trains on (the held-out cut removed), as a .jsonl ``distill`` reads;
    returns the held-out documents."""
    heldout, train_texts = heldout_split(load_texts(DATA, seed=seed), HELDOUT_DOCUMENTS)
    check_disjoint(train_texts, heldout, {})
    with path.open("w", encoding="utf-8") as f:
        for text in train_texts:
            f.write(json.dumps({"text": text}) + "\n")
    return heldout


def train_distilled(seed: int, steps: int, teacher: Path, out: Path) -> Path:
    """Distills ``teacher`` into ``out/distill``; returns the exported plain model folder."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train_texts.jsonl"
    write_training_texts(seed, data)
    return distill(distill_config(seed, steps, teacher, data, out / "distill")).model_dir


def plain_nll_check(folder: Path, text: str, expected: np.ndarray) -> float:
    """Largest |difference| between the token NLLs of ``text`` by transformers alone (the exported
    folder as any user loads it) and ``expected`` (the same tokens measured through quietstar)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :EVAL_MAX_LENGTH]
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    nll = -logprobs.gather(-1, ids[0, 1:, None])[:, 0].numpy()
    return float(np.abs(nll - expected[:nll.size]).max())


# ----------------------------------------------------------------------------- stages
def time_arm(args) -> None:
    """Seconds per step of one arm: the median of steps 2..N of a short run (step 1 warms up)."""
    out = Path(args.out or tempfile.mkdtemp(prefix=f"distillation-time-{args.arm}-"))
    started = time.perf_counter()
    if args.arm == "distilled":  # an untrained teacher thinks as long as a trained one
        teacher = build_model(train_config("quietstar", 0, 1, TEACHER_THOUGHT_TOKENS, out / "teacher-config"))
        teacher.save_pretrained(out / "teacher")
        train_distilled(0, args.steps, out / "teacher", out)
        times = step_times(out / "distill")
    else:
        arm = "quietstar" if args.arm == "teacher" else "cp"
        config = train_config(arm, 0, args.steps, TEACHER_THOUGHT_TOKENS, out / "train")
        config.eval_every = config.checkpoint_every = 10**6  # timing only: no evaluation, no checkpoint
        train_arm(config, arm)
        times = step_times(out / "train")
    print(json.dumps({"arm": args.arm, "steps": times, "median_s": statistics.median(times[1:]),
                      "wall_s": time.perf_counter() - started}))


def run_arm(args) -> None:
    """Train one arm at one seed, then measure it; everything lands in ``--out``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/distillation.py " + shlex.join(sys.argv[1:])
    heldout, _ = heldout_split(load_texts(DATA, seed=args.seed), HELDOUT_DOCUMENTS)
    texts = heldout[:2 if args.quick else NLL_DOCUMENTS]

    started = time.perf_counter()
    extra = {}
    if args.arm == "distilled":
        teacher_run = json.loads((Path(args.teacher) / "run.json").read_text())
        if teacher_run["arm"] != "teacher" or teacher_run["seed"] != args.seed:
            raise ValueError(f"--teacher {args.teacher} is the {teacher_run['arm']} arm of seed {teacher_run['seed']}; "
                             f"give the teacher arm of seed {args.seed}")
        model_dir = train_distilled(args.seed, args.steps, Path(teacher_run["model"]), out)
        model = load_quietstar_model(str(model_dir)).eval()
        extra = {"teacher": str(Path(args.teacher).resolve()), "model": str(model_dir)}
        log_dir = out / "distill"
    else:
        config = train_config("quietstar" if args.arm == "teacher" else "cp", args.seed, args.steps,
                              TEACHER_THOUGHT_TOKENS, out / "train")
        model = train_arm(config, "quietstar" if args.arm == "teacher" else "cp")
        if args.arm == "teacher":
            checkpoints = sorted((out / "train").glob("checkpoint-*"))
            extra = {"model": str((checkpoints[-1] / MODEL_DIR).resolve())}
        log_dir = out / "train"
    train_s = time.perf_counter() - started

    base_model = load_quietstar_model(EMBEDDED_MODEL).eval()
    nll = {}
    nll["untrained"], nll["document"] = token_nlls_without_thought(base_model, texts, EVAL_MAX_LENGTH,
                                                                    EVAL_BATCH_SIZE)
    nll["without"], document = token_nlls_without_thought(model, texts, EVAL_MAX_LENGTH, EVAL_BATCH_SIZE)
    if not np.array_equal(document, nll["document"]):
        raise RuntimeError("the arm and the untrained model cut the held-out text into different tokens")
    if args.arm == "teacher":  # the distribution it teaches: its own thoughts before every token
        nll["with"] = token_nlls(model, texts, max_length=EVAL_MAX_LENGTH, batch_size=EVAL_BATCH_SIZE,
                                 seed=args.seed, progress=True).thinking
    if args.arm == "distilled":
        extra["export_check_max_abs"] = plain_nll_check(Path(extra["model"]), texts[0], nll["without"])
    np.savez(out / "measured.npz", **nll)
    times = step_times(log_dir)
    summary = {"arm": args.arm, "seed": args.seed, "steps": args.steps, "quick": args.quick, "command": command,
               "train_s": train_s, "median_step_s": statistics.median(times),
               "measure_s": time.perf_counter() - started - train_s, **extra}
    (out / "run.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


# ----------------------------------------------------------------------------- report
# (first, second): "first - second", negative = the first predicts better. The first is primary.
COMPARISONS = (("distilled", "cp"), ("distilled", "teacher without"), ("distilled", "teacher with"),
               ("teacher with", "cp"), ("teacher with", "teacher without"), ("teacher without", "cp"))


def report(args) -> None:
    runs: dict[tuple[str, int], dict] = {}
    for folder in map(Path, args.runs):
        meta = json.loads((folder / "run.json").read_text())
        runs[meta["arm"], meta["seed"]] = dict(np.load(folder / "measured.npz")) | {"meta": meta}
    seeds = sorted({seed for arm, seed in runs if all((a, seed) in runs for a in ARMS)})
    left_out = sorted({seed for _, seed in runs} - set(seeds))
    if not seeds:
        raise ValueError("no seed has all three arms measured")
    untrained = runs["cp", seeds[0]]["untrained"]
    document = runs["cp", seeds[0]]["document"]
    for key, r in runs.items():
        if not (np.array_equal(r["untrained"], untrained) and np.array_equal(r["document"], document)):
            raise ValueError(f"{key} scored other held-out tokens")
    subsets = token_subsets(untrained)

    def nll(name: str, seed: int) -> np.ndarray:
        arm, _, which = name.partition(" ")
        return runs[arm, seed]["with" if which == "with" else "without"]

    result = {"seeds": seeds, "left_out_seeds": left_out, "hardest_tokens": int(subsets["hardest"].size),
              "tokens": int(untrained.size), "nll": {}, "differences": {}, "per_seed": {}, "arms": {}}
    for subset, index in (("hardest", subsets["hardest"]), ("all", subsets["all"])):
        result["nll"][subset] = {"untrained": float(untrained[index].mean())} | {
            name: float(np.mean([nll(name, s)[index].mean() for s in seeds]))
            for name in ("teacher with", "teacher without", "distilled", "cp")}
        for first, second in COMPARISONS:
            diffs = np.stack([nll(first, s)[index] - nll(second, s)[index] for s in seeds])
            cell = seed_summaries(diffs, document[index])
            result["differences"].setdefault(subset, {})[f"{first} - {second}"] = cell["pooled"]
            result["per_seed"].setdefault(subset, {})[f"{first} - {second}"] = cell["per_seed"]
    for arm in ARMS:
        metas = [runs[arm, s]["meta"] for s in seeds]
        result["arms"][arm] = {"steps": [m["steps"] for m in metas], "train_s": [round(m["train_s"]) for m in metas],
                               "median_step_s": [round(m["median_step_s"], 2) for m in metas]}
    result["arms"]["distilled"]["export_check_max_abs"] = max(runs["distilled", s]["meta"]["export_check_max_abs"]
                                                              for s in seeds)
    primary = result["differences"]["hardest"]["distilled - cp"]
    result["bar_met"] = primary["ci_high"] < 0
    command = "python experiments/distillation.py " + shlex.join(sys.argv[1:])
    write_results(Path(args.out), "Distillation against continued pretraining at equal compute", command, result,
                  [tables(result)])
    print(tables(result))


def tables(result: dict) -> str:
    names = {"hardest": "hardest 10%", "all": "all tokens"}
    lines = [f"Seeds {result['seeds']}" + (f" (left out, an arm missing: {result['left_out_seeds']})"
                                           if result["left_out_seeds"] else "")
             + f"; hardest 10% = {result['hardest_tokens']} of {result['tokens']} held-out tokens (by the "
             "untrained model's NLL). Nats/token, seed-averaged; differences with a 95% CI over seeds and "
             "documents, negative = the first predicts better.", "",
             "| arm | steps (per seed) | training s (per seed) |", "|---|---|---|"]
    lines += [f"| {arm} | {', '.join(map(str, a['steps']))} | {', '.join(map(str, a['train_s']))} |"
              for arm, a in result["arms"].items()]
    lines += ["", "| NLL | " + " | ".join(names.values()) + " |", "|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{result['nll'][s][name]:.3f}" for s in names) + " |"
              for name in result["nll"]["hardest"]]
    lines += ["", "| difference | " + " | ".join(names.values()) + " |", "|---|---|---|"]
    lines += [f"| {key} | " + " | ".join(format_cell(result["differences"][s][key], True) for s in names) + " |"
              for key in result["differences"]["hardest"]]
    lines += ["", f"Bar (hardest 10%, distilled - cp, CI below 0): **{'met' if result['bar_met'] else 'not met'}**. "
              f"The exported folder, loaded by transformers alone, gives the measured NLLs to "
              f"{result['arms']['distilled']['export_check_max_abs']:.1e} (first held-out document)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    for name in ("time", "run"):
        s = sub.add_parser(name)
        s.add_argument("--arm", choices=ARMS, required=True)
        s.add_argument("--steps", type=int, default=6)
        s.add_argument("--out", default=None, required=name == "run")
        if name == "run":
            s.add_argument("--seed", type=int, required=True)
            s.add_argument("--teacher", default=None, help="the distilled arm's teacher: the teacher arm's --out")
            s.add_argument("--quick", action="store_true",
                           help="measure on 2 documents: a check of the pipeline, not a result")
    s = sub.add_parser("report")
    s.add_argument("--out", required=True)
    s.add_argument("runs", nargs="+")
    args = p.parse_args(argv)
    if args.stage == "run" and args.arm == "distilled" and not args.teacher:
        p.error("--arm distilled needs --teacher (the teacher arm's --out of the same seed)")
    {"time": time_arm, "run": run_arm, "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
