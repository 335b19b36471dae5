"""One RLP step, native against the way GRPO engines do it: thought tokens trained per second
and peak memory, on CPU.

    python benchmarks/rlp_step.py            # k = 64 and 256 (a few minutes, one thread)
    python benchmarks/rlp_step.py --quick    # k = 64 only

Both take one optimiser step of the same objective, ``QuietStarConfig(objective="rlp")`` with
horizon 1 (information gain against an EMA copy, leave-one-out group advantage, clipped
surrogate on the thought tokens only), on the same tiny random Llama, one document of L tokens,
S chosen positions (evenly spaced), G thoughts of k tokens at each:

    native   QuietStarForCausalLM as ``quietstar train`` runs it (``TrainConfig``'s
             ``thought_tokens_per_backward``): the text pass once, the S x G thoughts sampled in
             parallel without gradients over its keys (k + 1 decoder calls), then scored and
             differentiated a group of positions at a time (one forward each, its graph freed
             before the next), the text pass's backward, AdamW step, EMA update
    engine   as GRPO engines do it (TRL, verl, OpenRLHF; here without vLLM) with the plain
             transformers model: per position, x_0..x_i START as the prompt, G completions of k
             tokens sampled by ``generate`` with a KV cache (no gradient), then prompt + thought
             + END through the model with gradients (logits of the last k + 2 tokens only, as
             TRL's ``logits_to_keep``): log pi of the thought tokens, log p(x_{i+1}) after END for
             the reward, the same loss, backward per position (one position's graph alive at a
             time, as gradient accumulation); then the AdamW step and the EMA update. The EMA
             copy's log p(x_{i+1} | x_<=i) comes from one pass over the text, which is cheaper
             than an engine's pass per prompt: the engine's numbers are if anything flattered.

The plain model holds START and END as two added rows (``resize_token_embeddings``) with the
native model's vectors; neither is ever sampled. ``tests/test_benchmarks.py`` checks that on the
same thoughts both ways give the same loss and gradients.

Conventions of ``train_step.py``: each k runs in a fresh subprocess on one thread, native and
engine built together and their steps timed interleaved (a busy machine slows both alike), time
the median of ``--reps`` steps after a warm-up step in process CPU time, memory the peak of live
tensor bytes during one further step above weights, EMA copy and optimiser state
(``train_step.LiveTensorBytes``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from train_step import MIB, LiveTensorBytes, lm_config, run_worker, tensors_of, tiny_tokenizer

from quietstar import QuietStarConfig, QuietStarForCausalLM, TrainConfig


def chosen_positions(length: int, count: int) -> list[int]:
    """``count`` evenly spaced positions of a text of ``length`` tokens, each with a next token."""
    return [int((j + 0.5) * (length - 1) / count) for j in range(count)]


def rlp_config(k: int, group: int, **overrides) -> QuietStarConfig:
    return QuietStarConfig(**{"objective": "rlp", "sampled_thought_tokens": k, "thoughts_per_position": group,
                              "ahead_tokens": 1, "thought_temperature": 0.7, **overrides})


class Engine:
    """The plain model trained on RLP as a GRPO engine would: prompts, ``generate``, scoring."""

    def __init__(self, plain, native: QuietStarForCausalLM):
        """``plain``: an untouched copy of the native model's LM (taken before ``from_base``)."""
        cfg = native.config
        self.lm = plain
        self.k, self.group, self.temperature = cfg.sampled_thought_tokens, cfg.thoughts_per_position, \
            cfg.thought_temperature
        self.clip = (cfg.clip_eps_low, cfg.clip_eps_high)
        self.ema_decay = cfg.ema_decay
        self.start_id, self.end_id = native.start_id, native.end_id
        rows = plain.get_input_embeddings().weight.shape[0]
        if max(self.start_id, self.end_id) >= rows:  # the meta tokens as added rows, never predicted
            plain.resize_token_embeddings(max(self.start_id, self.end_id) + 1, mean_resizing=False)
        with torch.no_grad():
            embed = plain.get_input_embeddings().weight
            embed[[self.start_id, self.end_id]] = native.get_input_embeddings().meta_vectors.to(embed.dtype)
        self.meta = torch.tensor([self.start_id, self.end_id])
        self.ema = copy.deepcopy(plain).requires_grad_(False).eval()
        pad = native.tokenizer.pad_token_id
        self.generation = dict(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0,
                               max_new_tokens=self.k, min_new_tokens=0, suppress_tokens=self.meta.tolist(),
                               eos_token_id=None, bos_token_id=None, pad_token_id=pad)

    def _masked(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(-1, self.meta, float("-inf"))

    @torch.no_grad()
    def sample(self, ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """[S, G, k]: G thoughts after each prompt x_0..x_i START (``ids`` [L], one document)."""
        self.lm.eval()  # sampled without dropout, as native samples
        out = []
        for i in positions:
            prompt = torch.cat([ids[:i + 1], self.meta[:1]]).expand(self.group, -1)
            generated = self.lm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                         **self.generation)
            out.append(generated[:, prompt.shape[1]:])
        self.lm.train()
        return torch.stack(out)

    @torch.no_grad()
    def ema_logp(self, ids: torch.Tensor) -> torch.Tensor:
        """[L - 1]: log p_EMA(x_{i+1} | x_<=i), one pass over the text."""
        logits = self._masked(self.ema(input_ids=ids[None]).logits[0, :-1])
        return logits.log_softmax(-1).gather(-1, ids[1:, None])[:, 0]

    def loss_backward(self, ids: torch.Tensor, positions: list[int], thoughts: torch.Tensor) -> dict[str, float]:
        """The RLP loss of ``thoughts`` [S, G, k] at ``positions``, its backward run position by
        position; returns the loss and the mean reward."""
        ema = self.ema_logp(ids)
        S, G, k = thoughts.shape
        total, rewards = 0.0, 0.0
        for i, thought in zip(positions, thoughts):
            seq = torch.cat([torch.cat([ids[:i + 1], self.meta[:1]]).expand(G, -1), thought,
                             self.meta[1:].expand(G, 1)], 1)                  # [G, i + k + 3]
            # the outputs of START .. END: predict t_1 .. t_k, (END: forced), x_{i+1}
            logits = self._masked(self.lm(input_ids=seq, logits_to_keep=k + 2).logits)  # [G, k + 2, V]
            logp = (logits[:, :k] / self.temperature).log_softmax(-1).gather(-1, thought[..., None])[..., 0]
            with torch.no_grad():
                after = logits[:, -1].log_softmax(-1)[:, ids[i + 1]]          # [G]
                reward = after - ema[i]
                advantage = (reward - reward.mean()) * G / (G - 1)
            ratio = torch.exp(logp - logp.detach())
            per_token = -torch.minimum(ratio * advantage[:, None],
                                       ratio.clamp(1 - self.clip[0], 1 + self.clip[1]) * advantage[:, None])
            loss = per_token.mean(-1).mean() / S
            loss.backward()
            total, rewards = total + loss.item(), rewards + reward.mean().item() / S
        return {"loss": total, "mean_reward": rewards}

    @torch.no_grad()
    def update_ema(self) -> None:
        for ema, live in zip(self.ema.parameters(), self.lm.parameters(), strict=True):
            ema.lerp_(live.detach(), 1.0 - self.ema_decay)


def build_pair(lm, tokenizer, config: QuietStarConfig) -> tuple[QuietStarForCausalLM, Engine]:
    """The native model and the engine on the same weights (``lm`` is wrapped in place)."""
    plain = copy.deepcopy(lm)  # before from_base routes the attention to quietstar's
    native = QuietStarForCausalLM.from_base(lm, tokenizer, config)
    native.ema_baseline_enable()
    return native, Engine(plain, native)


def build(spec: dict):
    """(step functions {"native", "engine"}, their (model, optimiser) pairs) for one k."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    L, k, S, G = spec["L"], spec["k"], spec["positions"], spec["G"]
    config = rlp_config(k, G)
    shape = lm_config("llama", spec["hidden"], spec["layers"], spec["heads"], spec["kv_heads"], spec["vocab"],
                      max_length=L + k + 8)
    lm = AutoModelForCausalLM.from_config(shape, attn_implementation="sdpa")
    native, engine = build_pair(lm, tiny_tokenizer(spec["vocab"]), config)
    ids = torch.randint(3, spec["vocab"], (L,))
    positions = chosen_positions(L, S)
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[0, positions] = True
    native.train()
    engine.lm.train()
    per_backward = TrainConfig().thought_tokens_per_backward  # what `quietstar train` uses
    native_opt = torch.optim.AdamW([p for p in native.parameters() if p.requires_grad], lr=1e-5)
    engine_opt = torch.optim.AdamW(engine.lm.parameters(), lr=1e-5)

    def native_step():
        native_opt.zero_grad(set_to_none=True)
        native(ids[None], thought_positions=mask, thought_tokens_per_backward=per_backward).loss.backward()
        native_opt.step()
        native.update_ema_baseline()

    def engine_step():
        engine_opt.zero_grad(set_to_none=True)
        engine.loss_backward(ids, positions, engine.sample(ids, positions))
        engine_opt.step()
        engine.update_ema()

    return {"native": native_step, "engine": engine_step}, {"native": (native, native_opt),
                                                            "engine": (engine.lm, engine.ema, engine_opt)}


def worker(spec: dict) -> dict:
    """Times native and engine steps interleaved, then each one's memory in one more step."""
    from quietstar.training.cpu import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()  # as `quietstar train` does on CPU, for both alike
    steps, held = build(spec)
    for step in steps.values():
        step()  # warm-up; also creates the optimiser state
    times = {name: [] for name in steps}
    for _ in range(spec["reps"]):
        for name, step in steps.items():
            start = time.process_time()  # one thread: robust on a shared machine
            step()
            times[name].append(time.process_time() - start)
    result = {}
    for name, step in steps.items():
        with LiveTensorBytes(tensors_of(*held[name])) as tracker:
            step()
        result[name] = {"time_s": statistics.median(times[name]), "peak_bytes": tracker.peak}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="k = 64 only")
    parser.add_argument("--thought-tokens", type=int, nargs="+", default=[64, 256], help="k")
    parser.add_argument("--length", type=int, default=512, help="L, tokens of the document")
    parser.add_argument("--positions", type=int, default=8, help="S, thinking positions")
    parser.add_argument("--group", type=int, default=8, help="G, thoughts per position")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=2, help="timed steps per configuration (median)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per k")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    ks = [64] if args.quick else args.thought_tokens
    print(f"Tiny Llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), "
          f"vocab {args.vocab}, fp32; L={args.length}, S={args.positions} positions, G={args.group}; one "
          f"thread, torch {torch.__version__}; time = median of {args.reps} step(s) (process CPU time); "
          "memory = peak live tensor MiB of one step above weights, EMA copy and optimiser state; "
          "thought tok/s = S x G x k / step time.\n")
    print("| k | native ms | engine ms | native thought tok/s | engine thought tok/s | speed native/engine "
          "| native MiB | engine MiB | mem native/engine |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for k in ks:
        spec = dict(L=args.length, k=k, positions=args.positions, G=args.group, hidden=args.hidden,
                    layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab, reps=args.reps)
        r = run_worker(__file__, json.dumps(spec), timeout=args.timeout)
        if "error" in r:
            print(f"| {k} | {r['error']} | | | | | | | |", flush=True)
            continue
        n, e = r["native"], r["engine"]
        tokens = args.positions * args.group * k
        print(f"| {k} | {1e3 * n['time_s']:.0f} | {1e3 * e['time_s']:.0f} | {tokens / n['time_s']:.0f} "
              f"| {tokens / e['time_s']:.0f} | {e['time_s'] / n['time_s']:.2f} | {n['peak_bytes'] / MIB:.1f} "
              f"| {e['peak_bytes'] / MIB:.1f} | {n['peak_bytes'] / e['peak_bytes']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
