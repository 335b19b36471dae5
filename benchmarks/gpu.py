"""Training at scale on one GPU: step time, tokens/s, MFU and peak memory of quietstar.

    python benchmarks/gpu.py                      # Llama-1B-like and Mistral-7B-like, L 256..4096
    python benchmarks/gpu.py --tiny --device cpu  # the same script at a toy size (CI smoke test)

Models are random-initialised from their configs (nothing is downloaded). Every step is a real
training step: bf16 autocast over fp32 master weights, AdamW, activation checkpointing of every
decoder layer and ``loss_chunk_tokens``. Per model, thought length k and text length L it times:

    ours    QuietStarForCausalLM (A=4 ahead tokens, n=2 thoughts per position, batch 1)
    ideal   F = k + A + 2 plain training passes of the base model (one batch of n*F rows, same
            checkpointing and loss chunking): the floor for any exact method
    dense   the paper code's rollout (benchmarks/dense_reference.py): pass by pass with dense
            masks; it cannot use activation checkpointing (its passes share a growing cache)

Columns: median step time, text tokens per second (B*L per step), MFU (the FLOPs of the ideal's
F training passes, 6*N*tokens plus causal attention, over the GPU's dense bf16 peak: the same
useful work for all three, so lower MFU = more overhead), and peak memory
(``torch.cuda.max_memory_allocated``: weights, gradients, optimiser state and activations).
A method that runs out of memory at some L is not tried at longer L; the summary gives the
longest L that fitted.

fp32 master weights with AdamW take 16 bytes per parameter, so a full 7B model (~116 GB) fits on
no single 80 GB GPU. The Mistral-7B-like config is therefore measured with ``--mistral-layers``
of its 32 layers (default 8); time and activation memory scale about linearly in the layer
count, and the output says so next to every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from contextlib import nullcontext

import torch

# Sibling modules: this folder is on sys.path when the file runs as a script.
from dense_reference import DenseQuietStar
from train_step import LiveTensorBytes, ideal_loss, tensors_of, tiny_tokenizer

from quietstar import QuietStarConfig

GIB = 2 ** 30
AHEAD, THOUGHTS_PER_POSITION, BATCH = 4, 2, 1

# Dense bf16 peak TFLOP/s by device name (no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def model_configs(tiny: bool, mistral_layers: int) -> dict:
    from transformers import LlamaConfig, MistralConfig

    if tiny:
        return {
            "llama-tiny": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512),
            "mistral-tiny": MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                          max_position_embeddings=512, sliding_window=None),
        }
    return {
        # Llama-3.2-1B's shape: 1.24B parameters, tied embeddings.
        "llama-1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
                                max_position_embeddings=8192),
        # Mistral-7B-v0.3's shape (no sliding window), cut to `mistral_layers` of 32 layers.
        f"mistral-7b[{mistral_layers}/32 layers]": MistralConfig(
            vocab_size=32768, hidden_size=4096, intermediate_size=14336,
            num_hidden_layers=mistral_layers, num_attention_heads=32, num_key_value_heads=8,
            head_dim=128, sliding_window=None, max_position_embeddings=8192),
    }


def train_flops(lm_config, params: int, rows: int, length: int, passes: int) -> float:
    """FLOPs of ``passes`` causal training passes over ``rows`` x ``length`` tokens: 6 N per token
    (N = ``params`` doing matmuls, the LM head included, the input embedding not) plus causal
    attention (QK and PV over length/2 keys on average, fwd + bwd)."""
    cfg = lm_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * length  # per token
    return (6 * params + attention) * rows * length * passes


def matmul_params(lm) -> int:
    """Parameters that take part in matmuls: all but the input embedding (unless it is the head)."""
    n = sum(p.numel() for p in lm.parameters())
    if not lm.config.get_text_config().tie_word_embeddings:
        n -= lm.get_input_embeddings().weight.numel()
    return n


class Runner:
    """Runs one method's training steps, catching out-of-memory."""

    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda"
                         else nullcontext())

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step_fn(self, module, loss_fn):
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=self.device.type == "cuda")

        def step():
            optimizer.zero_grad(set_to_none=True)
            with self.autocast:
                loss = loss_fn()
            loss.backward()
            optimizer.step()

        return step, optimizer

    def measure(self, module, loss_fn) -> dict:
        """{"time_s", "peak_bytes"} or {"error": "OOM"}."""
        step, optimizer = self.step_fn(module, loss_fn)
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step()  # warm-up (and optimiser state)
            self.sync()
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                step()
                self.sync()
                times.append(time.perf_counter() - start)
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated()
            else:  # CPU smoke mode: tensors of one step plus what was live before it
                optimizer.zero_grad(set_to_none=True)
                held = list(tensors_of(module, optimizer))
                with LiveTensorBytes(held) as tracker:
                    step()
                peak = tracker.peak + sum(t.untyped_storage().nbytes() for t in held)
            return {"time_s": statistics.median(times), "peak_bytes": peak}
        except torch.OutOfMemoryError:
            return {"error": "OOM"}
        finally:
            optimizer.zero_grad(set_to_none=True)
            del optimizer, step
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def sweep(runner, method, build_loss, module, lengths, thought_tokens, rows) -> None:
    """Measures one method over k x L into ``rows``; after an OOM, longer L are not tried."""
    for k in thought_tokens:
        failed = False
        for L in lengths:
            result = {"error": "OOM-skip"} if failed else runner.measure(module, build_loss(k, L))
            failed = "error" in result
            rows.append({"method": method, "k": k, "L": L, **result})
            print(f"  {method} k={k} L={L}: {format_result(result)}", file=sys.stderr, flush=True)


def format_result(r: dict) -> str:
    return r.get("error") or f"{1e3 * r['time_s']:.0f} ms, {r['peak_bytes'] / GIB:.2f} GiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="toy models, L 16/32, k 2, one rep: checks the script, not the GPU")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--thought-tokens", type=int, nargs="+", default=[8, 16], help="k")
    parser.add_argument("--methods", nargs="+", default=["ours", "ideal", "dense"],
                        choices=["ours", "ideal", "dense"])
    parser.add_argument("--models", nargs="+", default=None,
                        help="which configs to run (default: all), by name prefix, e.g. llama")
    parser.add_argument("--mistral-layers", type=int, default=8,
                        help="layers of the Mistral-7B-like config (of 32; see the module docstring)")
    parser.add_argument("--loss-chunk", type=int, default=QuietStarConfig().loss_chunk_tokens,
                        help="loss_chunk_tokens (default: the library's)")
    parser.add_argument("--reps", type=int, default=2, help="timed steps after one warm-up (median)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the device for MFU (default: by device name)")
    parser.add_argument("--generate-tokens", type=int, default=32,
                        help="new tokens in the generation comparison (0 skips it)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.lengths, args.thought_tokens, args.reps = [16, 32], [2], 1
        args.loss_chunk, args.generate_tokens = 32, min(args.generate_tokens, 4)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu (with --tiny for a quick check)")
    if device.type == "cpu":
        torch.set_num_threads(1)  # toy sizes: threads only contend
    runner = Runner(device, args.reps)
    name_of_device = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_tflops = args.peak_tflops or next(
        (v for key, v in PEAK_TFLOPS.items() if key in name_of_device), None)
    print(f"Device: {name_of_device}; torch {torch.__version__}; bf16 autocast "
          f"{'on' if device.type == 'cuda' else 'off (CPU)'}, fp32 master weights, AdamW, "
          f"activation checkpointing (ours, ideal), loss_chunk_tokens={args.loss_chunk}; "
          f"A={AHEAD}, n={THOUGHTS_PER_POSITION}, batch {BATCH}; median of {args.reps} step(s); "
          f"MFU peak {peak_tflops or 'unknown (pass --peak-tflops)'} TFLOP/s.\n", flush=True)

    configs = model_configs(args.tiny, args.mistral_layers)
    if args.models:
        configs = {k: v for k, v in configs.items() if any(k.startswith(m) for m in args.models)}
    for model_name, lm_config in configs.items():
        run_model(model_name, lm_config, args, runner, device, peak_tflops)
    return 0


def run_model(model_name, lm_config, args, runner, device, peak_tflops) -> None:
    """Generation line, then ours / ideal / dense over k x L, then the table for one config."""
    from transformers import AutoModelForCausalLM

    from quietstar import QuietStarForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(lm_config, attn_implementation="sdpa").to(device)
    qcfg = QuietStarConfig(ahead_tokens=AHEAD, thoughts_per_position=THOUGHTS_PER_POSITION,
                           loss_chunk_tokens=args.loss_chunk)
    model = QuietStarForCausalLM.from_base(lm, tiny_tokenizer(lm_config.vocab_size), qcfg)
    del lm
    params = matmul_params(model.lm)
    total = sum(p.numel() for p in model.lm.parameters())
    print(f"## {model_name}: {total / 1e9:.2f}B parameters\n" if total >= 1e8 else
          f"## {model_name}: {total / 1e6:.2f}M parameters\n", flush=True)

    def text(L):
        return torch.randint(3, lm_config.vocab_size, (BATCH, L), device=device)

    def with_k(config, k):
        return dataclasses.replace(config, sampled_thought_tokens=k)

    if args.generate_tokens:
        generation_line(model, text, args.generate_tokens, runner, args.tiny)

    rows = []
    model.activation_checkpointing_enable()
    model.train()
    if "ours" in args.methods:
        def ours_loss(k, L):
            ids = text(L)
            model.config = with_k(qcfg, k)
            return lambda: model(ids).loss
        sweep(runner, "ours", ours_loss, model, args.lengths, args.thought_tokens, rows)
    if "ideal" in args.methods:
        def ideal(k, L):
            rows_ids = text(L).repeat(THOUGHTS_PER_POSITION * with_k(qcfg, k).passes_per_step, 1)
            return lambda: ideal_loss(model.lm, rows_ids, args.loss_chunk)
        sweep(runner, "ideal", ideal, model.lm, args.lengths, args.thought_tokens, rows)
    if "dense" in args.methods:
        # The paper's rollout keeps a growing cache through its passes: no checkpointing.
        model.lm.activation_checkpointing_disable()
        dense = DenseQuietStar(model)  # a copy; drop the original so the GPU holds one
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        def dense_loss(k, L):
            ids = text(L)
            dense.model.config = with_k(qcfg, k)
            return lambda: dense(ids)[0]
        sweep(runner, "dense", dense_loss, dense, args.lengths, args.thought_tokens, rows)
        del dense
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    print("| method | k | L | step ms | text tokens/s | MFU | peak GiB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['k']} | {r['L']} | {r['error']} | - | - | - |")
            continue
        flops = train_flops(lm_config, params, BATCH * THOUGHTS_PER_POSITION, r["L"],
                            with_k(qcfg, r["k"]).passes_per_step)
        mfu = f"{100 * flops / r['time_s'] / (peak_tflops * 1e12):.1f}%" if peak_tflops else "-"
        print(f"| {r['method']} | {r['k']} | {r['L']} | {1e3 * r['time_s']:.0f} "
              f"| {BATCH * r['L'] / r['time_s']:.0f} | {mfu} | {r['peak_bytes'] / GIB:.2f} |")
    print("\nLongest L that fitted (of those tried):")
    for method in dict.fromkeys(r["method"] for r in rows):
        for k in dict.fromkeys(r["k"] for r in rows if r["method"] == method):
            mine = [r for r in rows if r["method"] == method and r["k"] == k]
            fitted = [r["L"] for r in mine if "error" not in r]
            note = "" if len(fitted) < len(mine) else " (every length tried fitted)"
            print(f"  {method} k={k}: {max(fitted) if fitted else 'none'}{note}")
    print(flush=True)


def generation_line(model, text, new_tokens: int, runner: Runner, tiny: bool) -> None:
    """Thinking generation against the base model's ``generate``, batch 1, greedy."""
    try:
        from quietstar.method.generation import generate
    except ImportError:
        print("(quietstar.method.generation not available: generation skipped)\n")
        return
    prompt = text(16 if tiny else 128)
    k = 2 if tiny else 8
    model.eval()

    def timed(fn):
        with torch.no_grad(), runner.autocast:
            fn()  # warm-up
            runner.sync()
            start = time.perf_counter()
            fn()
            runner.sync()
        return new_tokens / (time.perf_counter() - start)

    thinking = timed(lambda: generate(model, prompt, max_new_tokens=new_tokens, thought_tokens=k,
                                      eos_token_id=[]))
    base = timed(lambda: model.lm.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.tokenizer.pad_token_id))
    print(f"Generation (batch 1, prompt {prompt.shape[1]}, {new_tokens} new tokens, greedy): "
          f"thinking k={k}: {thinking:.1f} tokens/s; base generate: {base:.1f} tokens/s "
          f"({base / thinking:.1f}x; a thought costs k+1 = {k + 1} cached forward calls per "
          f"token)\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
