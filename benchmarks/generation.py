"""Speed of thinking generation against the base model's own ``generate``, on CPU.

    python benchmarks/generation.py                                  # tiny random Llama, ~3 min
    python benchmarks/generation.py --new-tokens 64 128 --thought-tokens 4 8
    python benchmarks/generation.py --model embedded:smollm2-135m-instruct --new-tokens 64 \\
        --thought-tokens 4 8 --thresholds 1 2 3

One prompt at a time (batch 1, the command line's case), one CPU thread, greedy tokens.

    base      the LM's transformers ``generate`` (greedy, its own cache), new tokens / s
    threshold ``thought_threshold``: think only before tokens whose base prediction has a higher
              entropy (nats); 0 = before every token (``--thresholds`` adds rows)
    thought   the share of the new tokens that thought
    think     ``QuietStarForCausalLM.generate`` with k-token thoughts (sampled at the model's
              thought temperature, seeded), new tokens / s
    target    0.8 x base / (1 + share (k + 2)): a thought is k + 2 model inputs (START, k tokens,
              END) and the token itself one more, so k + 3 single-token passes of the base model
              per new token that thinks and one per token that does not, with 20% slack for the
              mixing head and the thought sampling
    ratio     think / target (>= 1: on target)

Time is the process's CPU time, not wall time: with one thread the two agree on an idle machine,
but on a shared one wall time mostly measures the other processes. Each number is the best of
``--repeats`` runs after a warm-up. Neither side stops at an end-of-sequence token.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from quietstar import QuietStarConfig, QuietStarForCausalLM

PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def tiny_model() -> QuietStarForCausalLM:
    """A random Llama (4 layers, d = 128) with a small byte-level BPE tokenizer, built locally."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([PROMPT, "How many clips did Natalia sell altogether? --- 72"] * 8,
                            trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                                     pad_token="<pad>")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer) + 2, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(config).eval()
    return QuietStarForCausalLM.from_base(lm, tokenizer, QuietStarConfig())


def load(name: str) -> QuietStarForCausalLM:
    if name == "tiny":
        return tiny_model()
    from quietstar.models.loading import load_quietstar_model

    return load_quietstar_model(name, "cpu")


def best_rate(fn, prompt_len: int, new_tokens: int, repeats: int) -> float:
    """New tokens per second: the best of ``repeats`` timed runs of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        out = fn()
        best = min(best, time.process_time() - start)
        assert out.shape[1] == prompt_len + new_tokens, "a run stopped early"
    return new_tokens / best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (random, built here), a saved QuietStar folder, or a base model "
                             "such as embedded:smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--thought-tokens", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--thresholds", type=float, nargs="*", default=[],
                        help="thought_threshold values (nats) to run besides 0 (always thinking)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    model = load(args.model)
    lm = model.lm
    ids = model.tokenizer(args.prompt, return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    pad = model.tokenizer.pad_token_id

    def base(n):
        return lm.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=pad)

    def think(n, k, threshold, return_thoughts=False):
        return model.generate(ids, mask, max_new_tokens=n, thought_tokens=k, eos_token_id=[],
                              thought_threshold=threshold, return_thoughts=return_thoughts,
                              generator=torch.Generator().manual_seed(0))

    base(8), think(8, 2, 0.0)  # warm-up
    print(f"model {args.model}, prompt {ids.shape[1]} tokens, batch 1, 1 CPU thread, "
          f"tokens per CPU second, best of {args.repeats}")
    header = f"| {'new tokens':>10} | {'k':>3} | {'threshold':>9} | {'thought':>7} | {'base tok/s':>10} | " \
             f"{'think tok/s':>11} | {'target tok/s':>12} | {'ratio':>5} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for n in args.new_tokens:
        base_rate = best_rate(functools.partial(base, n), ids.shape[1], n, args.repeats)
        for k in args.thought_tokens:
            for threshold in [0.0] + [t for t in args.thresholds if t != 0]:
                rate = best_rate(functools.partial(think, n, k, threshold), ids.shape[1], n, args.repeats)
                share = think(n, k, threshold, return_thoughts=True).thought_taken.float().mean().item()
                target = 0.8 * base_rate / (1 + share * (k + 2))
                print(f"| {n:>10} | {k:>3} | {threshold:>9g} | {share:>7.0%} | {base_rate:>10.1f} | "
                      f"{rate:>11.2f} | {target:>12.2f} | {rate / target:>5.2f} |", flush=True)


if __name__ == "__main__":
    main()
