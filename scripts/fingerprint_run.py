"""A fingerprint of tiny training runs, to show that a change of structure changes no behaviour.

    python scripts/fingerprint_run.py        # prints one SHA-256 per run and one over all
    python scripts/fingerprint_run.py --ignore-metrics leak_rate,distinct_thoughts

``--ignore-metrics`` leaves logged metrics out of the hash: a change that only adds metrics gives
the earlier hash with them left out (same weights, same numbers otherwise).

Each run trains a tiny random Llama (built from a config, no hub) for a few steps on the built-in
corpus on one CPU thread, then hashes the final weights (every tensor's bytes, by name) and every
number of metrics.jsonl except the timings. Equal hashes before and after a refactor mean the
same weights, bit for bit, and the same logged numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_lm, make_tokenizer  # noqa: E402  (the tests' tiny models)

try:  # the package's top level (today); the module paths of the flat layout before it
    from quietstar import QuietStarForCausalLM, TrainConfig, train
except ImportError:
    from quietstar import QuietStarForCausalLM
    from quietstar.training.recipe import train
    from quietstar.training.config import TrainConfig

RUNS = {
    "all-positions": {},
    "fraction-entropy-ema": {"quietstar": {"thought_fraction": 0.5, "thought_selection": "entropy",
                                           "reward_baseline": "ema_base",
                                           "sampled_thought_tokens": 2, "ahead_tokens": 2}},
    "crop-thought-loss": {"data_mode": "crop", "quietstar": {"thought_loss_weight": 0.5}},
}
TIMINGS = ("time", "seconds", "per_second", "tokens_per", "elapsed", "eta")


def fingerprint(model_dir: Path, out: Path, ignored: tuple[str, ...] = (), **overrides) -> str:
    settings = dict(model=str(model_dir), output_dir=str(out), seq_len=16, batch_size=2,
                    micro_batch_size=1, max_steps=3, learning_rate=1e-3, warmup_steps=1,
                    eval_every=2, sample_every=0, num_documents=40, eval_documents=8,
                    quietstar={"sampled_thought_tokens": 2, "ahead_tokens": 2})
    quiet = {**settings["quietstar"], **overrides.pop("quietstar", {})}
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own summary
        result = train(TrainConfig.from_dict({**settings, **overrides, "quietstar": quiet}))
    h = hashlib.sha256()
    state = QuietStarForCausalLM.from_pretrained(result.checkpoint / "model").state_dict()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        kept = {k: v for k, v in record.items() if not any(t in k for t in TIMINGS) and k not in ignored}
        h.update(json.dumps(kept, sort_keys=True).encode())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ignore-metrics", default="", help="comma-separated metric names left out of the hash")
    ignored = tuple(name for name in parser.parse_args().ignore_metrics.split(",") if name)
    torch.set_num_threads(1)
    total = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny-llama"
        make_lm("llama").save_pretrained(model_dir)
        make_tokenizer().save_pretrained(model_dir)
        for name, overrides in RUNS.items():
            digest = fingerprint(model_dir, Path(tmp) / name, ignored, **overrides)
            total.update(digest.encode())
            print(f"{name:24s} {digest}")
    print(f"{'all':24s} {total.hexdigest()}")


if __name__ == "__main__":
    main()
