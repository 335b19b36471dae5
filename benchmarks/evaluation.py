"""Time of the direct score (quietstar.evaluation.tasks.direct_scores) with thoughts off and on, on CPU.

    python benchmarks/evaluation.py --data /path/to/gsm8k.jsonl --limit 50 --thought-tokens 4

With thoughts on, the direct score thinks only at the positions that predict the answer tokens
(about 8 of a GSM8K item's ~150), sampling and scoring in one rollout (``model.think``), so its
cost is the text pass plus a few rows' passes. The target is at most 2x the time with thoughts
off. Time is process CPU time with one thread (see benchmarks/generation.py for why).
"""

from __future__ import annotations

import argparse
import time

import torch

from quietstar.evaluation.tasks import direct_scores, load_items
from quietstar.models.loading import load_quietstar_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct",
                        help="a saved QuietStar folder or a base model (wrapped untrained)")
    parser.add_argument("--data", required=True, help="GSM8K-format JSONL")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--thought-tokens", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    model = load_quietstar_model(args.model, "cpu")
    items = load_items("gsm8k", args.data, args.limit)
    times = {}
    for k in (0, args.thought_tokens):
        start = time.process_time()
        direct_scores(model, items, "gsm8k", k, batch_size=args.batch_size,
                      generator=torch.Generator().manual_seed(0))
        times[k] = time.process_time() - start
    off, on = times[0], times[args.thought_tokens]
    print(f"model {args.model}, {len(items)} GSM8K items, batch {args.batch_size}, 1 CPU thread")
    print("| thoughts | direct score CPU s | on / off |\n|---|---|---|")
    print(f"| off | {off:.3f} | 1.00 |\n| k = {args.thought_tokens} | {on:.3f} | {on / off:.2f} |")


if __name__ == "__main__":
    main()
