"""One distillation step (``quietstar distill``) on CPU: the teacher on the fly, from a top-k cache,
and a plain next-token step of the same LM, with the cache's size and one-off cost.

    python benchmarks/distill_step.py            # k = 4 and 12 thought tokens (a few minutes, one thread)
    python benchmarks/distill_step.py --quick    # k = 4 only

On a tiny random Llama saved as a QuietStar teacher (mixing head drawn, so thoughts count), one
optimiser step of batch B x L tokens, all positions thinking, temperature 1:

    on the fly   DistillRecipe.train_step: the teacher's rollout (k + 1 decoder calls, no
                 gradient), the student's forward, T^2 KL through both chunked heads, backward,
                 AdamW step; the teacher held beside the student
    cache        the same recipe with --teacher-cache (top_k ids per position): the step reads
                 its rows from the shards instead of running the teacher, which is not held
    plain        the student's LM alone: forward, next-token NLL through the chunked head,
                 backward, AdamW step (what one step of continued pretraining costs)

plus the cache's one-off write (one pass of the teacher over the steps, per step) and its bytes
on disk per token. Conventions of ``train_step.py``: each k in a fresh subprocess on one thread
(``keep_freed_memory`` applied), the three steps timed interleaved, time the median of ``--reps``
steps after a warm-up step in process CPU time; "peak" is the most live tensor bytes during one
further step above what is held (``train_step.LiveTensorBytes``), "held" the weights and
optimiser state alive during the steps (the teacher's included on the fly).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_step import MIB, LiveTensorBytes, ideal_loss, lm_config, run_worker, tensors_of, tiny_tokenizer

from quietstar import QuietStarConfig, QuietStarForCausalLM


def held_bytes(*objects) -> int:
    """Bytes of the distinct tensor storages held by models and optimisers."""
    seen = {}
    for t in tensors_of(*objects):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def make_teacher(spec: dict, folder: Path) -> None:
    """A tiny random Llama as a QuietStar model with a drawn mixing head, saved to ``folder``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    shape = lm_config("llama", spec["hidden"], spec["layers"], spec["heads"], spec["kv_heads"], spec["vocab"],
                      max_length=spec["L"] + spec["k"] + 8)
    lm = AutoModelForCausalLM.from_config(shape, attn_implementation="sdpa")
    config = QuietStarConfig(sampled_thought_tokens=spec["k"], ahead_tokens=1)
    teacher = QuietStarForCausalLM.from_base(lm, tiny_tokenizer(spec["vocab"]), config)
    with torch.no_grad():
        for p in teacher.mixing_head.parameters():
            p.normal_(0, 0.5)
    teacher.save_pretrained(folder)


def write_data(path: Path, vocab: int, tokens: int) -> None:
    """Documents of random words of the tiny tokenizer (each one token), ``tokens`` in all."""
    rng = random.Random(0)
    words = [f"w{rng.randrange(vocab - 3)}" for _ in range(tokens)]
    path.write_text("\n\n".join(" ".join(words[i:i + 200]) for i in range(0, tokens, 200)), encoding="utf-8")


def worker(spec: dict) -> dict:
    """The three steps of one k measured in this process (files in a temporary folder)."""
    from quietstar.training.cpu import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as root:
        return measure_in(Path(root), spec)


def measure_in(root: Path, spec: dict) -> dict:
    from quietstar.training.distill import DistillRecipe
    from quietstar.training.distill_config import DistillConfig
    from quietstar.training.teacher_cache import INDEX_NAME

    make_teacher(spec, root / "teacher")
    steps = spec["reps"] + 2  # warm-up, the timed steps, the memory step
    write_data(root / "data.txt", spec["vocab"], 2 * steps * spec["B"] * spec["L"])
    common = dict(teacher=str(root / "teacher"), data=str(root / "data.txt"), seq_len=spec["L"],
                  batch_size=spec["B"], max_steps=steps, checkpoint_every=10 ** 6, device="cpu")
    fly = DistillRecipe(DistillConfig(output_dir=str(root / "fly"), **common))
    fly.setup()
    cached = DistillRecipe(DistillConfig(output_dir=str(root / "cached"), teacher_cache=str(root / "cache"),
                                         cache_top_k=spec["top_k"], **common))
    cached.setup_run_folder()
    cached.setup_teacher()
    cached.setup_data()
    start = time.process_time()
    cached.setup_teacher_cache()  # the one-off write: one teacher pass over every step
    write_s = (time.process_time() - start) / steps
    cached.setup_student()
    cached.setup_optimizer()
    cached.start_data()
    cache_bytes = sum(p.stat().st_size for p in (root / "cache").iterdir() if p.name != INDEX_NAME)

    plain_lm = copy.deepcopy(fly.student.lm).train()
    plain_opt = torch.optim.AdamW(plain_lm.parameters(), lr=1e-5)
    text = torch.randint(3, spec["vocab"], (spec["B"], spec["L"]))

    def plain_step():
        plain_opt.zero_grad(set_to_none=True)
        ideal_loss(plain_lm, text, 256).backward()
        plain_opt.step()

    counters = {"fly": 0, "cached": 0}

    def recipe_step(name, recipe):
        def step():
            recipe.train_step(counters[name])
            counters[name] += 1
        return step

    runs = {"fly": recipe_step("fly", fly), "cached": recipe_step("cached", cached), "plain": plain_step}
    held = {"fly": (fly.teacher, fly.student, fly.optimizer), "cached": (cached.student, cached.optimizer),
            "plain": (plain_lm, plain_opt)}
    for step in runs.values():
        step()
    times = {name: [] for name in runs}
    for _ in range(spec["reps"]):
        for name, step in runs.items():
            start = time.process_time()
            step()
            times[name].append(time.process_time() - start)
    result = {"write_s_per_step": write_s, "cache_bytes_per_token": cache_bytes / (steps * spec["B"] * spec["L"])}
    for name, step in runs.items():
        with LiveTensorBytes(tensors_of(*held[name])) as tracker:
            step()
        result[name] = {"time_s": statistics.median(times[name]), "peak_bytes": tracker.peak,
                        "held_bytes": held_bytes(*held[name])}
    for recipe in (fly, cached):
        recipe.lock.release()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="k = 4 only")
    parser.add_argument("--thought-tokens", type=int, nargs="+", default=[4, 12], help="the teacher's k")
    parser.add_argument("--length", type=int, default=128, help="L, tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="B, sequences per step")
    parser.add_argument("--top-k", type=int, default=64, help="ids per position in the cache")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=3, help="timed steps per configuration (median)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per k")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    ks = [4] if args.quick else args.thought_tokens
    print(f"Tiny Llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), "
          f"vocab {args.vocab}, fp32; B={args.batch} x L={args.length}, every position thinks, cache top-k "
          f"{args.top_k}; one thread, torch {torch.__version__}; time = median of {args.reps} step(s) (process CPU "
          "time); peak = live tensor MiB of one step above what is held; held = weights and optimiser state "
          "(MiB); write = the cache's one-off cost per step written.\n")
    print("| k | on the fly ms | cache ms | plain ms | on the fly peak | cache peak | plain peak | on the fly held "
          "| cache held | plain held | write ms/step | cache bytes/token |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for k in ks:
        spec = dict(k=k, L=args.length, B=args.batch, top_k=args.top_k, hidden=args.hidden, layers=args.layers,
                    heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab, reps=args.reps)
        r = run_worker(__file__, json.dumps(spec), timeout=args.timeout)
        if "error" in r:
            print(f"| {k} | {r['error']} |" + " |" * 10, flush=True)
            continue
        f, c, p = r["fly"], r["cached"], r["plain"]
        print(f"| {k} | {1e3 * f['time_s']:.0f} | {1e3 * c['time_s']:.0f} | {1e3 * p['time_s']:.0f} "
              f"| {f['peak_bytes'] / MIB:.1f} | {c['peak_bytes'] / MIB:.1f} | {p['peak_bytes'] / MIB:.1f} "
              f"| {f['held_bytes'] / MIB:.1f} | {c['held_bytes'] / MIB:.1f} | {p['held_bytes'] / MIB:.1f} "
              f"| {1e3 * r['write_s_per_step']:.0f} | {r['cache_bytes_per_token']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
