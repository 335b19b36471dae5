"""Training-step time and memory on CPU: quietstar against the ideal and the dense rollout.

    python benchmarks/train_step.py            # full table (about 10 minutes, one thread)
    python benchmarks/train_step.py --quick    # a small subset (about a minute)

Three ways to take one optimiser step on the same tiny random Llama, batch 1, n thoughts:

    ours    QuietStarForCausalLM: sample and score the thoughts in the same F passes (with
            gradients; with activation checkpointing: sample, then score the grid), backward,
            AdamW step
    ideal   the base model alone: F = k + A + 2 plain forward+backward passes over the n copies
            of the text (next-token loss), one after another, then an AdamW step. Ours scores
            the same F passes with gradients, so this is the floor for its time. Its memory is
            one pass's; an exact method needs all F passes alive at once for the backward (the
            "all passes" column of the memory-modes table runs them as one batch), so ours/ideal
            memory should be about constant in L, not 1
    dense   the paper code's rollout (benchmarks/dense_reference.py): F passes with dense masks
            over keys concatenated from all earlier passes, backward, AdamW step

Every (L, k) runs in a fresh subprocess on one thread; ours and ideal are built together and
their steps timed interleaved, so a busy machine slows both alike, and dense runs in a process of
its own. Time is the median of ``--reps`` steps after one warm-up step, in process CPU time with
one thread (robust on a shared machine; equal to wall time on an idle one), else wall time.
Every worker first applies ``quietstar.training.cpu.keep_freed_memory`` (as ``quietstar train`` does on
CPU): glibc then keeps freed memory for reuse instead of faulting it back in every step.
Memory is the peak of live tensor bytes during one further step
above what was live before it (weights and optimiser state excluded, gradients included): every
tensor storage an operation creates is counted from its creation until it is freed, the CPU
analogue of ``torch.cuda.max_memory_allocated``. It is exact and free of allocator noise, and
ignores memory outside tensors (the Python heap, allocator caches), which is the same for all
three.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import weakref

import torch

# A sibling module: this folder is on sys.path when the file runs as a script.
from dense_reference import DenseQuietStar
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from quietstar import QuietStarConfig

MIB = 2 ** 20


# ---------------------------------------------------------------------------- memory
class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created under it, from creation until freed.

    ``existing`` tensors (weights, optimiser state) are known up front, so in-place updates of
    them and views into them are not counted. ``peak`` is the most bytes alive at once.
    """

    def __init__(self, existing=()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = weakref.WeakSet()
        for t in existing:
            self._seen.add(t.untyped_storage())

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._seen:
                    self._seen.add(storage)
                    nbytes = storage.nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    # Storages keep their Python object while alive, so this fires when it is freed.
                    weakref.finalize(storage, self._free, nbytes)
        return out


def tensors_of(*modules_and_optimizers):
    """Every tensor a model or optimiser holds (parameters, buffers, optimiser state)."""
    for obj in modules_and_optimizers:
        if isinstance(obj, torch.nn.Module):
            yield from obj.parameters()
            yield from obj.buffers()
        else:
            for state in obj.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------------------- models
def tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer with ``vocab_size`` entries, a pad token and "---" (the meta init)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "---"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def lm_config(family: str, hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, max_length: int):
    """A Llama (MLP 2.75 x hidden) or a Mistral (Mistral-7B's 3.5 x hidden, no sliding window)."""
    from transformers import LlamaConfig, MistralConfig

    shape = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=kv_heads, max_position_embeddings=max_length, tie_word_embeddings=False)
    if family == "mistral":
        return MistralConfig(intermediate_size=int(hidden * 3.5), sliding_window=None, **shape)
    return LlamaConfig(intermediate_size=int(hidden * 2.75), **shape)


def ideal_loss(lm, rows: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """The plain training pass: next-token NLL of the base model over ``rows`` [R, L], with the
    same log-likelihood function (and vocabulary chunking) as quietstar's losses."""
    from quietstar.method.vocab import VocabHead

    hidden = lm.get_decoder()(input_ids=rows, use_cache=False).last_hidden_state
    head = lm.get_output_embeddings()
    vocab = VocabHead(head.weight, head.bias, None, torch.zeros(0, dtype=torch.long), chunk_tokens)
    return -vocab.logprobs(hidden[:, :-1], rows[:, 1:]).mean()


def build(spec: dict):
    """(step function, modules and optimiser) for one configuration ``spec``."""
    from transformers import AutoModelForCausalLM

    from quietstar import QuietStarForCausalLM

    torch.manual_seed(0)
    k, A, n, L = spec["k"], spec["ahead"], spec["n"], spec["L"]
    # The paper's code (dense) keeps all logits; ours and the ideal chunk them as the library does.
    chunk = 0 if spec["method"] == "dense" else spec.get("chunk", QuietStarConfig().loss_chunk_tokens)
    qcfg = QuietStarConfig(sampled_thought_tokens=k, ahead_tokens=A, thoughts_per_position=n,
                           loss_chunk_tokens=chunk,
                           thought_fraction=spec.get("fraction", 1.0),
                           thought_selection=spec.get("selection", "entropy"))
    F = qcfg.passes_per_step
    shape = lm_config(spec.get("model", "llama"), spec["hidden"], spec["layers"], spec["heads"],
                          spec["kv_heads"], spec["vocab"], max_length=L + F + 8)
    lm = AutoModelForCausalLM.from_config(shape, attn_implementation="sdpa")
    ids = torch.randint(3, spec["vocab"], (spec["batch"], L))
    method = spec["method"]
    if method == "plain":  # the base model's own training step on the text: one pass
        model = lm

        def forward_backward():
            model(input_ids=ids, labels=ids).loss.backward()
    elif method in ("ideal", "all-passes"):
        model = lm
        if spec.get("checkpointing"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if method == "ideal":  # F plain passes over the n copies of the text, one at a time
            rows, repeats = ids.repeat(n, 1), F
        else:  # the same F passes as one batch: all alive at once, as in any exact method
            rows, repeats = ids.repeat(n * F, 1), 1

        def forward_backward():
            for _ in range(repeats):
                ideal_loss(model, rows, chunk).backward()
    else:
        model = QuietStarForCausalLM.from_base(lm, tiny_tokenizer(spec["vocab"]), qcfg)
        if spec.get("checkpointing"):
            model.activation_checkpointing_enable()
        if method == "dense":
            model = DenseQuietStar(model)

            def forward_backward():
                model(ids)[0].backward()
        else:
            def forward_backward():
                model(ids).loss.backward()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()

    return step, model, optimizer


def worker(specs: list[dict]) -> list[dict]:
    """Times the steps of ``specs`` interleaved (so a busy machine slows them alike and their
    ratio stays fair), then measures each one's memory in one more step under the tracker."""
    from quietstar.training.cpu import keep_freed_memory

    threads = specs[0]["threads"]
    torch.set_num_threads(threads)
    # As `quietstar train` does on CPU, for every method alike: otherwise glibc returns the
    # memory of a step's activations to the system and faults it back in on the next step.
    keep_freed_memory()
    # One thread: the process's CPU time, which other processes on a shared machine barely move
    # (on an idle machine it equals wall time). More threads: wall time.
    clock = time.process_time if threads == 1 else time.perf_counter
    built = [build(spec) for spec in specs]
    for step, _, _ in built:
        step()  # warm-up; also creates the optimiser state
    times = [[] for _ in specs]
    for rep in range(max(spec["reps"] for spec in specs)):
        for (step, _, _), t, spec in zip(built, times, specs):
            if rep < spec["reps"]:  # reps 0: memory only
                start = clock()
                step()
                t.append(clock() - start)
    # The process's peak resident set so far (weights, optimiser state, the interpreter and its
    # libraries included), before the tracked step's bookkeeping: one spec's own only in a
    # process of its own (``rss_table``).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results = []
    for (step, model, optimizer), t in zip(built, times):
        optimizer.zero_grad(set_to_none=True)
        with LiveTensorBytes(tensors_of(model, optimizer)) as tracker:
            step()
        results.append({"time_s": statistics.median(t) if t else None, "peak_bytes": tracker.peak,
                        "peak_rss_bytes": rss})
    return results


# ---------------------------------------------------------------------------- driver
def run_worker(script: str, *worker_args: str, timeout: float) -> dict:
    """Runs ``script --worker *worker_args`` in a fresh Python process and returns the last JSON
    object it printed; a crash or a timeout is returned as ``{"error": ...}`` (stderr's last line,
    or "timeout"). The benchmarks that measure one configuration per process share it."""
    cmd = [sys.executable, os.path.abspath(script), "--worker", *worker_args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines()[-1:] or ["crashed"])[0]}
    return json.loads(lines[-1])


def measure(groups: list[list[dict]], timeout: float) -> list[dict]:
    """Runs each group of specs (timed together, see ``worker``) one after another in a fresh
    process; a crash (e.g. out of memory) or a timeout marks the specs not yet reported."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(groups)]
    specs = [spec for group in groups for spec in group]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        stdout, stderr, failed = proc.stdout, proc.stderr, proc.returncode != 0
        error = "OOM" if proc.returncode in (-9, 137) or "can't allocate" in stderr else None
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        stdout, stderr, failed, error = out.decode() if isinstance(out, bytes) else out, "", True, "timeout"
    results = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if failed:
        error = error or (stderr.strip().splitlines()[-1:] or ["crashed"])[0]
        print(f"  worker failed: {error}", file=sys.stderr)
    return results + [{"error": error}] * (len(specs) - len(results))


def ms(r: dict) -> str:
    if r.get("time_s") is None:
        return r.get("error") or "-"
    return f"{1e3 * r['time_s']:.0f}"


def mib(r: dict) -> str:
    return r.get("error") or f"{r['peak_bytes'] / MIB:.1f}"


def ratio(a: dict, b: dict, key: str) -> str:
    if "error" in a or "error" in b:
        return "-"
    return f"{a[key] / b[key]:.2f}"


def _median_rss(results: list[dict]) -> dict:
    """One result whose peak RSS is the median of ``results``' (and "rss_range" their span, MiB)."""
    good = sorted((r for r in results if "error" not in r), key=lambda r: r["peak_rss_bytes"])
    if len(good) < len(results):
        return next(r for r in results if "error" in r)
    low, high = good[0]["peak_rss_bytes"] / MIB, good[-1]["peak_rss_bytes"] / MIB
    return dict(good[len(good) // 2], rss_range=f"{low:.0f}-{high:.0f}")


def cost_table(args, base: dict) -> int:
    """Time and peak RSS at one size (the first of ``--lengths`` and ``--thought-tokens``).

    Ours and the ideal in three modes (the vocabulary chunked, ``--chunk``; chunked with
    activation checkpointing; all logits kept, chunk 0) are timed interleaved in one process;
    dense and the plain model's step on their own. Every row's peak RSS comes from a fresh
    process of its own (build, warm-up, one step), "all passes" (the ideal's F passes as one
    batch: the memory floor of an exact method) included."""
    L, k = args.lengths[0], args.thought_tokens[0]
    modes = [{}, {"checkpointing": True}, {"chunk": 0}]
    specs = [dict(base, method=m, L=L, k=k, **extra) for extra in modes for m in ("ours", "ideal")]
    specs += [dict(base, method=m, L=L, k=k, reps=0 if m == "all-passes" else base["reps"])
              for m in ("all-passes", "dense", "plain")]
    timed = measure([specs[:6]], args.timeout)
    timed += [measure([[spec]], args.timeout)[0] for spec in specs[6:]]
    # Peak RSS moves by up to ~10% between identical processes (the C heap's layout): the
    # median of --rss-runs processes, one spec each (the timing process counts where it had one spec).
    runs = [[] if i < 6 else [t] for i, t in enumerate(timed)]
    for i, spec in enumerate(specs):
        while len(runs[i]) < args.rss_runs:
            runs[i].append(measure([[dict(spec, reps=min(spec["reps"], 1))]], args.timeout)[0])
    rss = [_median_rss(r) for r in runs]
    F = 1 + (k + 2) + args.ahead - 1
    print(f"Tiny {args.model.capitalize()}: hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
          f"({args.kv_heads} kv), vocab {args.vocab}, fp32; L={L}, k={k}, A={args.ahead}, "
          f"n={args.thoughts_per_position}, F={F}, batch {args.batch}; {args.threads} thread(s), torch "
          f"{torch.__version__}; time = median of {args.reps} step(s); peak RSS = ru_maxrss of a process "
          f"of its own (weights, optimiser state, interpreter and libraries included), median of "
          f"{args.rss_runs} processes [min-max]; live = peak "
          "live tensor MiB of one step above weights and optimiser state. Dense keeps all logits, as "
          "the paper's code; plain is the base model's own step (its loss) on the batch.\n")
    print("| method | loss_chunk_tokens | checkpointing | ms | time / ideal | peak RSS MiB | RSS / plain "
          "| RSS / dense | live MiB |\n|---|---|---|---|---|---|---|---|---|")
    plain, dense = rss[-1], rss[-2]

    def rss_cell(r):
        return r.get("error") or f"{r['peak_rss_bytes'] / MIB:.0f} [{r['rss_range']}]"

    def rss_ratio(r, other):
        return "-" if "error" in r or "error" in other else f"{r['peak_rss_bytes'] / other['peak_rss_bytes']:.2f}"

    for i, (spec, t, r) in enumerate(zip(specs, timed, rss)):
        ideal = timed[i + 1] if spec["method"] == "ours" else None  # the same mode's ideal
        chunk = {"dense": 0, "plain": "- (its own loss)"}.get(spec["method"], spec.get("chunk", base["chunk"]))
        print(f"| {spec['method']} | {chunk} | {'yes' if spec.get('checkpointing') else 'no'} | {ms(t)} "
              f"| {ratio(t, ideal, 'time_s') if ideal else '-'} "
              f"| {rss_cell(r)} "
              f"| {rss_ratio(r, plain)} "
              f"| {rss_ratio(r, dense)} | {mib(t)} |", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cost", action="store_true",
                        help="the Cost issue's comparison: a Mistral (hidden 256, 4 layers, 8 heads, 2 kv, "
                             "vocab 32000) at L 256, k 9; time and peak RSS of ours, the ideal, dense "
                             "and the plain model's step, each method's RSS in a process of its own")
    parser.add_argument("--rss-runs", type=int, default=3,
                        help="with --cost: processes whose peak RSS is taken, per row (median)")
    parser.add_argument("--quick", action="store_true",
                        help="defaults L 64,128,256, k 4,8, one timed rep, memory modes at 256 8 "
                             "(about a minute)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--thought-tokens", type=int, nargs="+", default=[4, 8, 16],
                        help="k, sampled thought tokens")
    parser.add_argument("--methods", nargs="*", default=["ours", "ideal", "dense"],
                        choices=["ours", "ideal", "dense"], help="of the main table (none: no main table)")
    parser.add_argument("--model", default="llama", choices=["llama", "mistral"])
    parser.add_argument("--ahead", type=int, default=4, help="A, ahead tokens")
    parser.add_argument("--thoughts-per-position", type=int, default=2, help="n")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3, help="timed steps per configuration (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dense-cap-mib", type=float, default=3072,
                        help="skip dense runs whose memory, extrapolated as L^2 from the previous "
                             "length, would exceed this (OOM-skip)")
    parser.add_argument("--memory-modes-at", type=int, nargs=2, default=[512, 8], metavar=("L", "K"),
                        help="length and k of the loss-chunking / checkpointing table (0 0: none)")
    parser.add_argument("--chunk", type=int, default=QuietStarConfig().loss_chunk_tokens,
                        help="loss_chunk_tokens of ours and the ideal (0: all logits kept; dense "
                             "always keeps them, as the paper's code)")
    parser.add_argument("--fractions-at", type=int, nargs=2, default=[512, 9], metavar=("L", "K"),
                        help="length and k of the thought-fraction table (0 0: none)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25, 0.1],
                        help="thought_fraction values of that table, each against 1.0")
    parser.add_argument("--selection", choices=["entropy", "random"], default="entropy",
                        help="thought_selection in that table")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        for group in json.loads(args.worker):
            for result in worker(group):
                print(json.dumps(result), flush=True)
        return 0
    presets = {"quick": {"lengths": [64, 128, 256], "thought_tokens": [4, 8], "reps": 1,
                         "memory_modes_at": [256, 8], "fractions_at": [256, 9]},
               "cost": {"model": "mistral", "hidden": 256, "layers": 4, "heads": 8, "kv_heads": 2,
                        "vocab": 32000, "lengths": [256], "thought_tokens": [9]}}
    for preset, values in presets.items():  # smaller defaults; options given explicitly still win
        if getattr(args, preset):
            for name, value in values.items():
                if getattr(args, name) == parser.get_default(name):
                    setattr(args, name, value)

    base = dict(ahead=args.ahead, n=args.thoughts_per_position, batch=args.batch, hidden=args.hidden,
                layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab,
                reps=args.reps, threads=args.threads, model=args.model, chunk=args.chunk)
    if args.cost:
        return cost_table(args, base)
    print(f"Tiny {args.model.capitalize()}: hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
          f"({args.kv_heads} kv), vocab {args.vocab}; batch {args.batch}, A={args.ahead}, "
          f"n={args.thoughts_per_position}; {args.threads} thread(s), torch {torch.__version__}; "
          f"time = median of {args.reps} step(s) ({'process CPU' if args.threads == 1 else 'wall'} "
          "time), memory = peak live tensor MiB of one step.\n",
          flush=True)

    if args.methods:
        main_table(args, base)
    L, k = args.memory_modes_at
    if L:
        memory_modes_table(args, base)
    if args.fractions_at[0]:
        fraction_table(args, base)
    return 0


def main_table(args, base: dict) -> None:
    """ours, ideal and dense for every (L, k)."""
    header = ("| L | k | F | ours ms | ideal ms | time ours/ideal | ours MiB | ideal MiB "
              "| mem ours/ideal | dense ms | dense MiB | time dense/ours | mem dense/ours |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for k in args.thought_tokens:
        F = 1 + (k + 2) + args.ahead - 1
        dense_before = None  # (L, result) of the last dense run at this k
        for L in args.lengths:
            methods = list(args.methods)
            res = {}
            if "dense" in methods and dense_before is not None:
                prev_L, prev = dense_before
                if "error" in prev:  # it only gets bigger
                    res["dense"] = {"error": "OOM-skip" if prev["error"].startswith("OOM") else prev["error"]}
                elif prev["peak_bytes"] * (L / prev_L) ** 2 / MIB > args.dense_cap_mib:
                    res["dense"] = {"error": "OOM-skip"}
                if "dense" in res:
                    methods.remove("dense")
            # ours and ideal are timed together; dense (slow, may run out of memory) on its own.
            groups = [[dict(base, method=m, L=L, k=k) for m in methods if m != "dense"]]
            groups += [[dict(base, method="dense", L=L, k=k)]] if "dense" in methods else []
            groups = [g for g in groups if g]
            order = [spec["method"] for group in groups for spec in group]
            res.update(zip(order, measure(groups, args.timeout)))
            if "dense" in args.methods:
                dense_before = (L, res["dense"])
            o, i, d = (res.get(m, {"error": "-"}) for m in ("ours", "ideal", "dense"))
            rows.append(f"| {L} | {k} | {F} | {ms(o)} | {ms(i)} | {ratio(o, i, 'time_s')} | {mib(o)} "
                        f"| {mib(i)} | {ratio(o, i, 'peak_bytes')} | {ms(d)} | {mib(d)} "
                        f"| {ratio(d, o, 'time_s')} | {ratio(d, o, 'peak_bytes')} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows), flush=True)


def memory_modes_table(args, base: dict) -> None:
    """Loss chunking and activation checkpointing at one size, ours against ideal and all passes."""
    L, k = args.memory_modes_at
    print(f"\nMemory modes at L={L}, k={k} (none: loss_chunk_tokens=0, all logits kept; loss chunk: "
          f"loss_chunk_tokens={args.chunk}; checkpointing: every decoder layer recomputed in the "
          "backward):\n")
    modes = [("none", {"chunk": 0}), ("loss chunk", {"chunk": args.chunk}),
             ("checkpointing", {"chunk": 0, "checkpointing": True}),
             ("loss chunk + checkpointing", {"chunk": args.chunk, "checkpointing": True})]
    specs = [dict(base, method=m, L=L, k=k, **extra, **({"reps": 0} if m == "all-passes" else {}))
             for _, extra in modes for m in ("ours", "ideal", "all-passes")]
    results = measure([specs], args.timeout)
    print("| memory mode | ours ms | ideal ms | time ours/ideal | ours MiB | ideal MiB "
          "| all passes MiB | mem ours/all passes |\n|---|---|---|---|---|---|---|---|")
    for i, (name, _) in enumerate(modes):
        o, d, a = results[3 * i:3 * i + 3]
        print(f"| {name} | {ms(o)} | {ms(d)} | {ratio(o, d, 'time_s')} | {mib(o)} | {mib(d)} "
              f"| {mib(a)} | {ratio(o, a, 'peak_bytes')} |", flush=True)


def fraction_table(args, base: dict) -> None:
    """Ours at thought_fraction < 1 against ours at 1.0 (every position thinks), timed together.
    A step at fraction f runs the text pass over L tokens and F - 1 passes over f L rows, so its
    ideal share of the all-position step is (1 + f (F - 1)) / F; the target allows 15% more."""
    L, k = args.fractions_at
    F = 1 + (k + 2) + args.ahead - 1
    fractions = [1.0] + [f for f in args.fractions if f != 1.0]
    specs = [dict(base, method="ours", L=L, k=k, fraction=f, selection=args.selection) for f in fractions]
    results = measure([specs], args.timeout)
    print(f"\nThought fraction at L={L}, k={k}, F={F} (selection: {args.selection}); ideal = "
          "(1 + f (F - 1)) / F of the all-position step, target <= 1.15 x ideal:\n")
    print("| fraction | ours ms | ours MiB | time / all | mem / all | ideal | time / ideal | mem / ideal |\n"
          "|---|---|---|---|---|---|---|---|")
    everywhere = results[0]
    for f, r in zip(fractions, results):
        ideal = (1 + f * (F - 1)) / F
        cells = ["-"] * 4
        if "error" not in r and "error" not in everywhere:
            t, m = r["time_s"] / everywhere["time_s"], r["peak_bytes"] / everywhere["peak_bytes"]
            cells = [f"{t:.2f}", f"{m:.2f}", f"{t / ideal:.2f}", f"{m / ideal:.2f}"]
        print(f"| {f:g} | {ms(r)} | {mib(r)} | {cells[0]} | {cells[1]} | {ideal:.2f} | {cells[2]} "
              f"| {cells[3]} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
