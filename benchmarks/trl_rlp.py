"""The same RLP work through TRL's GRPOTrainer and through native quietstar: thought tokens trained
per second and peak memory, on CPU, one thread.

    python benchmarks/trl_rlp.py            # L = 512, 8 positions, G = 8, k = 64, 2 timed steps
    python benchmarks/trl_rlp.py --quick    # L = 128, k = 16, 1 timed step (a smoke run)

Both take optimiser steps of ``objective="rlp"`` (horizon 1, temperature 0.7) on one document of
L tokens of the tiny random Llama of ``rlp_step.py`` (fp32), S evenly spaced positions, G
thoughts of k tokens at each, AdamW, the EMA update:

    native   ``rlp_step.build``'s native step: the text pass once, all S x G thoughts sampled and
             scored in parallel in k + 2 decoder calls, one backward
    trl      ``trl.GRPOTrainer`` with ``quietstar.training.trl_grpo`` (prepare_policy,
             position_dataset's rows at the same positions, ThoughtReward, grpo_config): HF
             ``generate`` (no vLLM on a CPU) samples the S x G completions, the reward reads
             each (prefix, thought) again and the EMA copy each prefix, TRL's loss and backward

Time is process CPU time per optimiser step (the median of ``--reps`` steps after a warm-up; the
trainer's step includes its generation and reward), memory the peak of live tensor bytes during
one further step above weights, EMA copy and optimiser state (``train_step.LiveTensorBytes``).
Each runs in its own subprocess. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
from rlp_step import build, chosen_positions, rlp_config
from train_step import MIB, LiveTensorBytes, lm_config, run_worker, tensors_of, tiny_tokenizer


def native(spec: dict) -> dict:
    steps, held = build(spec)
    step = steps["native"]
    step()  # warm-up; creates the optimiser state
    times = []
    for _ in range(spec["reps"]):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    with LiveTensorBytes(tensors_of(*held["native"])) as tracker:
        step()
    return {"time_s": statistics.median(times), "peak_bytes": tracker.peak}


def trl_run(spec: dict) -> dict:
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOTrainer

    from quietstar.training import trl_grpo

    torch.manual_seed(0)
    L, k, S, G = spec["L"], spec["k"], spec["positions"], spec["G"]
    config = rlp_config(k, G)
    shape = lm_config("llama", spec["hidden"], spec["layers"], spec["heads"], spec["kv_heads"], spec["vocab"],
                      max_length=L + k + 8)
    tokenizer = tiny_tokenizer(spec["vocab"])
    policy = trl_grpo.prepare_policy(AutoModelForCausalLM.from_config(shape, attn_implementation="sdpa"),
                                     tokenizer, config)
    ids = torch.randint(3, spec["vocab"], (L,)).tolist()
    text = tokenizer.decode(ids)
    rows = [{"prompt": tokenizer.decode(ids[:i + 1]) + config.start_thought_token, "prefix_ids": ids[:i + 1],
             "target_ids": ids[i + 1:i + 2], "position": i, "document": 0} for i in chosen_positions(L, S)]
    assert tokenizer(text).input_ids == ids
    import datasets

    reward = trl_grpo.ThoughtReward(tokenizer, config)
    times, peak = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            self.start = time.process_time()
            if state.global_step == spec["reps"] + 1:  # the last step: its memory
                self.tracker = LiveTensorBytes(tensors_of(policy, reward.ema, optimizer))
                self.tracker.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == spec["reps"] + 2:
                self.tracker.__exit__(None, None, None)
                peak["bytes"] = self.tracker.peak
            elif state.global_step > 1:
                times.append(time.process_time() - self.start)

    with tempfile.TemporaryDirectory() as out:
        args = trl_grpo.grpo_config(config, output_dir=out, max_steps=spec["reps"] + 2, learning_rate=1e-5,
                                    per_device_train_batch_size=S * G, report_to="none", use_cpu=True, bf16=False,
                                    save_strategy="no", logging_steps=1, disable_tqdm=True, shuffle_dataset=False,
                                    dataloader_num_workers=0)
        data = datasets.Dataset.from_list(rows * (spec["reps"] + 2))
        trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[reward.callback, Clock()])
        trainer.train()
    return {"time_s": statistics.median(times), "peak_bytes": peak["bytes"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="L = 128, k = 16, one timed step")
    parser.add_argument("--thought-tokens", type=int, default=64, help="k")
    parser.add_argument("--length", type=int, default=512, help="L, tokens of the document")
    parser.add_argument("--positions", type=int, default=8, help="S, thinking positions")
    parser.add_argument("--group", type=int, default=8, help="G, thoughts per position")
    parser.add_argument("--reps", type=int, default=2, help="timed steps (median)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per way")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torch.set_num_threads(1)
        from quietstar.training.cpu import keep_freed_memory

        keep_freed_memory()  # as `quietstar train` does on CPU, for both alike
        name, spec = args.worker
        print(json.dumps((native if name == "native" else trl_run)(json.loads(spec))), flush=True)
        return 0
    L, k, reps = (128, 16, 1) if args.quick else (args.length, args.thought_tokens, args.reps)
    spec = dict(L=L, k=k, positions=args.positions, G=args.group, hidden=128, layers=2, heads=4, kv_heads=2,
                vocab=1000, reps=reps)
    tokens = args.positions * args.group * k
    print(f"Tiny Llama (rlp_step.py's), fp32; L={L}, S={args.positions}, G={args.group}, k={k}; one thread, "
          f"torch {torch.__version__}; median of {reps} step(s), process CPU time; thought tok/s = S x G x k / "
          "step time; memory = peak live tensor MiB of one step above weights, EMA copy and optimiser state.\n")
    print("| way | ms / step | thought tok/s | peak MiB |\n|---|---|---|---|", flush=True)
    for name in ("native", "trl"):
        r = run_worker(__file__, name, json.dumps(spec), timeout=args.timeout)
        if "error" in r:
            print(f"| {name} | {r['error']} | | |", flush=True)
            continue
        print(f"| {name} | {1e3 * r['time_s']:.0f} | {tokens / r['time_s']:.0f} | {r['peak_bytes'] / MIB:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
