"""Does thinking help? Quiet-STaR against plain continued pretraining, at a CPU-sized scale.

Three arms see the same model, data order, steps, optimiser, learning-rate schedule and seed:

  1. ``quietstar``  Quiet-STaR training (``quietstar.training.recipe.train``), measured with thoughts and
                    without (its own base prediction);
  2. ``control``    plain continued pretraining: next-token NLL of the base LM on the same
                    batches, no thoughts;
  3. ``base``       the untrained model.

Held-out documents (the first ``--heldout-documents`` of the data, never trained on) are scored
token by token. The primary metric, fixed before any run, is the NLL on the hardest 10% of
held-out tokens (ranked by the untrained model's NLL), compared as

    NLL(arm 1 with thoughts) - NLL(arm 2)             and
    NLL(arm 1 with thoughts) - NLL(arm 1 without),

negative meaning thinking helps, with 95% paired bootstrap intervals over documents. Direct
GSM8K / CommonsenseQA scores (``quietstar.evaluation.tasks.direct_scores``) of local question files are
reported alongside.

    python experiments/evidence.py --data ../shared/data/gsm8k/train.jsonl \\
        --gsm8k-questions ../shared/data/gsm8k/train.jsonl --out docs/results/my-run

writes ``results.md`` (tables, command, configuration), ``results.json``, ``curves.png``,
``difficulty.png``, per-token NLLs (``nll_<arm>.npz``) and the arms' run folders into ``--out``.
Finished arms are kept on disk, so a re-run with ``--reuse`` skips them (e.g. after an
interruption) and only redoes what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from quietstar.evaluation.analysis import token_nlls
from quietstar.training.checkpoint import MODEL_DIR, latest_checkpoint, step_of
from quietstar.method.config import QuietStarConfig
from quietstar.data.corpora import heldout_split, load_texts
from quietstar.evaluation.tasks import direct_scores, load_items
from quietstar.evaluation.evidence import (ARMS, COMPARISONS, LABELS, arm_nlls, token_nlls_without_thought,
                                token_subsets, verdict, write_results)
from quietstar.training.metrics import read_metrics
from quietstar.models.modeling import QuietStarForCausalLM
from quietstar.models.loading import EMBEDDED_MODEL
from quietstar.training.optim import build_optimizer, lr_at, set_learning_rate
from quietstar.evaluation.plots import new_figure, save_figure
from quietstar.evaluation.statistics import format_cell, summarize
from quietstar.training.recipe import train
from quietstar.training.config import TrainConfig
from quietstar.training.components import build_data, build_model



# ----------------------------------------------------------------------------- configuration
def method_settings(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs as QuietStarConfig fields (values read as YAML scalars)."""
    fields = {f.name for f in dataclasses.fields(QuietStarConfig)}
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE with KEY a QuietStarConfig field "
                             f"(one of {', '.join(sorted(fields))})")
        settings[key] = yaml.safe_load(value)
    return settings


def train_config(args: argparse.Namespace, output_dir: Path) -> TrainConfig:
    """The one training configuration both trained arms share."""
    method = QuietStarConfig(**{
        "sampled_thought_tokens": args.thought_tokens, "ahead_tokens": args.ahead_tokens,
        "thoughts_per_position": args.thoughts_per_position,
        "policy_loss_weight": args.policy_loss_weight, "base_loss_weight": args.base_loss_weight,
        "mixed_loss_weight": args.mixed_loss_weight,
        "mixing_head_hidden_size": args.mixing_head_hidden_size, **method_settings(args.set)})
    return TrainConfig(
        model=args.model, data=args.data, num_documents=args.num_documents, output_dir=str(output_dir),
        seq_len=args.seq_len, batch_size=args.batch_size, micro_batch_size=1, max_steps=args.steps,
        learning_rate=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
        mixing_head_lr_multiplier=args.mixing_head_lr_multiplier,
        policy_max_grad_norm=args.policy_max_grad_norm,
        # Held-out documents are the first --heldout-documents of the data; train() leaves them out
        # of training only when it evaluates, so it evaluates once (one batch) at the end.
        eval_every=args.steps, eval_batches=1, eval_documents=args.heldout_documents,
        sample_every=max(1, args.steps // 5), checkpoint_every=args.steps, keep_checkpoints=1,
        quietstar=method)


# ----------------------------------------------------------------------------- the control arm
def plain_nll(model: QuietStarForCausalLM, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean next-token NLL of the base LM (no thoughts), the loss of plain pretraining."""
    logits = model.base_logits(input_ids, attention_mask)[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)


def train_control(config: TrainConfig) -> QuietStarForCausalLM:
    """Continued pretraining with train()'s optimiser, schedule, clipping and batches."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out)
    torch.manual_seed(config.seed)
    model = build_model(config).eval()
    batches, _ = build_data(config, model.tokenizer)  # the same held-out cut and order as train()
    optimizer = build_optimizer(model, config)
    with (out / "metrics.jsonl").open("w", encoding="utf-8") as log:
        for step, batch in zip(range(config.max_steps), batches):
            t0 = time.perf_counter()
            lr = lr_at(step, config)
            set_learning_rate(optimizer, lr)
            loss = plain_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.write(json.dumps({"step": step + 1, "loss": loss.item(), "lr": lr,
                                  "grad_norm": float(grad_norm),
                                  "step_time_s": time.perf_counter() - t0}) + "\n")
            log.flush()
    model.eval()
    return model


# ----------------------------------------------------------------------------- measurements
def question_sets(args: argparse.Namespace) -> dict[str, list]:
    sets = {}
    for task, path in (("gsm8k", args.gsm8k_questions), ("csqa", args.csqa_questions)):
        if path:
            sets[task] = load_items(task, path, limit=args.question_limit)
    return sets


def check_disjoint(train_texts, heldout: list[str], questions: dict[str, list]) -> None:
    """No held-out document or question may appear inside a training document."""
    probes = [(f"held-out document {i}", t) for i, t in enumerate(heldout)]
    probes += [(f"{task} question {item.id}", item.question) for task, items in questions.items()
               for item in items]
    for text in train_texts:
        for name, probe in probes:
            if probe in text:
                raise ValueError(f"{name} appears in the training data; hold it out (raise "
                                 "--heldout-documents to cover the question slice, or give "
                                 "questions from a file that is not trained on)")


def measure(model: QuietStarForCausalLM, args, texts, questions, thoughts: bool,
            path: Path) -> dict[str, np.ndarray]:
    """Per-token NLLs, then direct scores, of one model (with and without thoughts if
    ``thoughts``), saved to ``path`` after each part so an interrupted run keeps what it measured."""
    out: dict[str, np.ndarray] = {}
    if thoughts:
        nll = token_nlls(model, texts, max_length=args.eval_max_length, batch_size=args.eval_batch_size,
                         seed=args.seed)
        out |= {"nll_with": nll.thinking, "nll_without": nll.base, "document": nll.document}
    else:
        out["nll_without"], out["document"] = token_nlls_without_thought(model, texts, args.eval_max_length,
                                                               args.eval_batch_size)
    np.savez(path, **out)
    for task, items in questions.items():
        out[f"{task}_without"] = direct_scores(model, items, task, 0, batch_size=args.eval_batch_size)
        if thoughts:
            generator = torch.Generator().manual_seed(args.seed)
            out[f"{task}_with"] = direct_scores(model, items, task, model.config.sampled_thought_tokens,
                                                batch_size=args.eval_batch_size, generator=generator)
        np.savez(path, **out)
    return out


def run_arm(name: str, out: Path, reuse: bool, make) -> dict[str, np.ndarray]:
    """``make(path)``'s measurements, saved to ``path`` = ``nll_<name>.npz`` (or loaded from it
    with --reuse). The file is first written under a temporary name, so only a finished arm is
    ever reused."""
    path = out / f"nll_{name}.npz"
    if reuse and path.exists():
        print(f"[{name}] reusing {path}", flush=True)
        return dict(np.load(path))
    t0 = time.perf_counter()
    partial = out / f"partial_{name}.npz"
    result = make(partial)
    partial.replace(path)
    print(f"[{name}] done in {time.perf_counter() - t0:.0f}s", flush=True)
    gc.collect()
    return result


# ----------------------------------------------------------------------------- report
def compare(arms: dict[str, dict[str, np.ndarray]], seed: int) -> dict:
    """Mean and hardest-10% NLL of every arm and the paired differences, with bootstrap CIs."""
    nll = arm_nlls(arms)
    base = nll["base"]
    document = arms["base"]["document"]
    for name, values in nll.items():
        if values.shape != base.shape:
            raise RuntimeError(f"arm {name} scored {values.size} tokens, the base model {base.size}")
    subsets = token_subsets(base)
    order, hardest = subsets["all"], subsets["hardest"]
    result = {"n_tokens": int(base.size), "n_documents": int(np.unique(document).size),
              "hardest_min_base_nll": float(base[hardest].min()), "nll": {}, "difference": {},
              "deciles": []}
    for subset, index in subsets.items():
        result["nll"][subset] = {a: summarize(nll[a][index], document[index], seed) for a in ARMS}
        result["difference"][subset] = {
            f"{a} - {b}": summarize(nll[a][index] - nll[b][index], document[index], seed)
            for a, b in COMPARISONS}
    for index in np.array_split(order, 10):
        result["deciles"].append({
            "base_nll": float(base[index].mean()),
            **{f"{a} - {b}": summarize(nll[a][index] - nll[b][index], document[index], seed)
               for a, b in COMPARISONS[:3]}})
    tasks = sorted({k.rsplit("_", 1)[0] for k in arms["base"] if k not in ("nll_without", "document")})
    result["direct"] = {}
    for task in tasks:
        scores = {"quietstar_with": arms["quietstar"][f"{task}_with"],
                  "quietstar_without": arms["quietstar"][f"{task}_without"],
                  "control": arms["control"][f"{task}_without"], "base": arms["base"][f"{task}_without"]}
        result["direct"][task] = {
            "score": {a: summarize(scores[a], seed=seed) for a in ARMS},
            "difference": {f"{a} - {b}": summarize(scores[a] - scores[b], seed=seed)
                           for a, b in COMPARISONS}}
    return result


def tables(result: dict) -> str:
    n = result["nll"]
    lines = [(f"Held-out: {result['n_documents']} documents, {result['n_tokens']} tokens; hardest "
              f"10% = {n['hardest']['base']['n']} tokens with base NLL >= "
              f"{result['hardest_min_base_nll']:.2f}. Mean [95% bootstrap CI over documents], "
              "nats/token."),
             "", "| arm | NLL, all tokens | NLL, hardest 10% |", "|---|---|---|"]
    lines += [f"| {LABELS[a]} | {format_cell(n['all'][a])} | {format_cell(n['hardest'][a])} |" for a in ARMS]
    lines += ["", "Paired differences (first minus second; negative = first predicts better):", "",
              "| difference | all tokens | hardest 10% | hardest 10%: verdict |", "|---|---|---|---|"]
    for i, (a, b) in enumerate(COMPARISONS):
        key = f"{a} - {b}"
        d = result["difference"]
        name = f"{'**' if i < 2 else ''}{a} - {b}{'** (primary)' if i < 2 else ''}"
        lines.append(f"| {name} | {format_cell(d['all'][key], True)} | {format_cell(d['hardest'][key], True)} | "
                     f"{verdict(d['hardest'][key]) if i < 3 else ''} |")
    for task, direct in result["direct"].items():
        count = direct["score"]["base"]["n"]
        lines += ["", (f"Direct {task} score ({count} held-out questions; probability of the gold "
                       "answer under the answer-restricted softmax; higher is better):"), "",
                  "| arm | score | | difference | value |", "|---|---|---|---|---|"]
        diffs = list(direct["difference"].items())
        for i, a in enumerate(ARMS):
            diff = f"| {diffs[i][0]} | {format_cell(diffs[i][1], True, 4)} |" if i < len(diffs) else "| | |"
            lines.append(f"| {LABELS[a]} | {format_cell(direct['score'][a], digits=4)} | {diff}")
    return "\n".join(lines)


def plot_curves(quietstar_dir: Path, control_dir: Path, path: Path) -> None:
    """Reward, mixing weight and the training losses of both trained arms against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    q, c = read_metrics(quietstar_dir / "metrics.jsonl"), read_metrics(control_dir / "metrics.jsonl")
    # What the model predicts at every token; runs logged before it existed have mixed_nll_1 (the
    # same number when every position thinks).
    with_key = "model_nll" if any("model_nll" in r for r in q) else "mixed_nll_1"
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)

    def series(records, key):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return zip(*points) if points else ((), ())

    panels = ((axes[0], "REINFORCE reward", [(q, "mean_reward", "mean reward")]),
              (axes[1], "mixing weight", [(q, "mean_mixing_weight", "mean mixing weight w")]),
              (axes[2], "training NLL", [(q, "base_nll", "Quiet-STaR, without thought"),
                                         (q, with_key, "Quiet-STaR, with thought"),
                                         (c, "loss", "continued pretraining")]))
    for ax, title, lines in panels:
        for records, key, label in lines:
            x, y = series(records, key)
            ax.plot(x, y, label=label, linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_deciles(result: dict, path: Path) -> None:
    """Per-decile NLL differences of the trained arms against token difficulty."""
    fig, ax = new_figure(8, 4.8)
    ax.axhline(0.0, color="0.4", linewidth=1)
    x = np.array([d["base_nll"] for d in result["deciles"]])
    for (a, b), color, shift in zip(COMPARISONS[:3], ("tab:blue", "tab:orange", "tab:green"), (-0.04, 0, 0.04)):
        key = f"{a} - {b}"
        y = np.array([d[key]["mean"] for d in result["deciles"]])
        err = [y - [d[key]["ci_low"] for d in result["deciles"]],
               [d[key]["ci_high"] for d in result["deciles"]] - y]
        ax.errorbar(x + shift * x.max(), y, yerr=err, marker="o", capsize=3, color=color, label=key)
    ax.set_xlabel("token difficulty: mean NLL of the untrained model in the decile (nats)")
    ax.set_ylabel("NLL difference (nats/token; < 0: first arm better)")
    ax.set_title("Held-out NLL difference by token difficulty (deciles, 95% CI)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="base model (as quietstar train takes it)")
    p.add_argument("--data", default="builtin:arithmetic", help="training text (as quietstar train takes it)")
    p.add_argument("--num-documents", type=int, default=None, help="use only the first N documents")
    p.add_argument("--heldout-documents", type=int, default=60,
                   help="the first N documents are held out: never trained on, NLL measured on them")
    p.add_argument("--nll-documents", type=int, default=None,
                   help="measure the NLL on the first N held-out documents only (default: all of "
                        "them); e.g. hold out many documents for direct-score questions but "
                        "measure NLL on a few")
    p.add_argument("--gsm8k-questions", default=None, help="local GSM8K-format JSONL for direct scores")
    p.add_argument("--csqa-questions", default=None, help="local CommonsenseQA-format JSONL for direct scores")
    p.add_argument("--question-limit", type=int, default=40, help="score the first N questions of each file")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--thought-tokens", type=int, default=4)
    p.add_argument("--ahead-tokens", type=int, default=4)
    p.add_argument("--thoughts-per-position", type=int, default=2)
    p.add_argument("--policy-loss-weight", type=float, default=1e6)
    p.add_argument("--base-loss-weight", type=float, default=QuietStarConfig.base_loss_weight,
                   help="weight of the no-thought NLL in arm 1 (the control's loss has weight 1)")
    p.add_argument("--mixed-loss-weight", type=float, default=QuietStarConfig.mixed_loss_weight)
    p.add_argument("--mixing-head-hidden-size", type=int, default=None)
    p.add_argument("--mixing-head-lr-multiplier", type=float, default=TrainConfig.mixing_head_lr_multiplier)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other QuietStarConfig field of arm 1 (repeatable), e.g. "
                        "--set reward_source=thought --set thought_fraction=0.25")
    p.add_argument("--policy-max-grad-norm", type=float, default=None,
                   help="clip arm 1's REINFORCE gradient apart from its NLL gradient at this norm "
                        "(TrainConfig.policy_max_grad_norm; default: one gradient, clipped together)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-max-length", type=int, default=128, help="tokens per held-out window")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--reuse", action="store_true", help="keep the arms already measured in --out")
    p.add_argument("--train-only", action="store_true",
                   help="only train arm 1 into OUT/quietstar (nothing measured): a variant to score "
                        "with thought_content.py on the same held-out text")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = "python experiments/evidence.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config = train_config(args, out / "quietstar")
    if args.train_only:
        return {"checkpoint": str(train(config).checkpoint), "elapsed_s": time.perf_counter() - started}

    # Held-out text and questions, checked disjoint from everything trained on.
    model = build_model(config).eval()
    batches, _ = build_data(config, model.tokenizer)
    heldout, _ = heldout_split(load_texts(args.data, seed=args.seed, num_documents=args.num_documents),
                               args.heldout_documents)  # the cut build_data makes
    questions = question_sets(args)
    check_disjoint(batches.texts, heldout, questions)
    if args.nll_documents is not None:
        if not 1 <= args.nll_documents <= len(heldout):
            raise ValueError(f"--nll-documents must be between 1 and the {len(heldout)} held-out "
                             f"documents, got {args.nll_documents}")
        heldout = heldout[:args.nll_documents]

    arms = {"base": run_arm("base", out, args.reuse, lambda p: measure(model, args, heldout, questions, False, p))}
    model = None  # freed before the trained arms load theirs

    control_config = TrainConfig.from_dict({**config.to_dict(), "output_dir": str(out / "control")})
    arms["control"] = run_arm("control", out, args.reuse, lambda p: measure(
        train_control(control_config), args, heldout, questions, False, p))

    def quietstar_arm(path):
        done = latest_checkpoint(config.output_dir)  # trained, but not yet measured
        if not (args.reuse and done is not None and step_of(done) == config.max_steps):
            done = train(config).checkpoint
        trained = QuietStarForCausalLM.from_pretrained(done / MODEL_DIR)
        return measure(trained, args, heldout, questions, True, path)

    arms["quietstar"] = run_arm("quietstar", out, args.reuse, quietstar_arm)

    result = compare(arms, args.seed)
    result |= {"command": command, "elapsed_s": time.perf_counter() - started}
    plot_curves(out / "quietstar", out / "control", out / "curves.png")
    plot_deciles(result, out / "difficulty.png")
    write_results(out, f"Evidence run `{out.name}`", command, result, [
        (f"Wall time {result['elapsed_s'] / 60:.1f} min. Primary metric (fixed in advance): "
         "hardest-10% held-out NLL differences marked **primary** below."), "", tables(result), "",
        "![training curves](curves.png)", "", "![difficulty](difficulty.png)", "",
        "Training configuration (both trained arms):", "", f"```yaml\n{config.to_yaml()}```"])
    print(tables(result))
    return result


if __name__ == "__main__":
    main()
