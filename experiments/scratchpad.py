"""A toy where the content of a thought must matter: ``builtin:scratchpad`` on a tiny model.

The corpus (``quietstar/scratchpad_corpus.py``) is two-step arithmetic: ``a * b + c * e = d``
(mod 10), written either with the partial products on a scratchpad, ``= --- p q --- d``, or
terse, ``= d``. A tiny Llama is first pretrained on it as a plain LM (the "base model": it learns
the worked steps well and the terse answer poorly); then Quiet-STaR trains it with
``quietstar.train.train``. Measured on held-out *terse* documents (another seed's, checked
disjoint from training), at the answer tokens d, the tokens a thought can help:

  * NLL of d with the model's own thoughts, with uniform random thoughts and with its own
    thoughts moved L/2 positions on (``evaluation.thoughts_for``), and without a thought, each
    with a paired bootstrap 95% CI over documents;
  * how often the thought sampled at the "=" before d is exactly "p q", the partial products
    (the useful content), before and after Quiet-STaR training, with examples.

    python experiments/scratchpad.py --out docs/results/scratchpad-seed1 --seed 1
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.analysis import token_nlls
from quietstar.scratchpad_corpus import SCRATCHPAD_WORDS, partial_products, scratchpad_corpus, scratchpad_tokenizer
from quietstar.statistics import format_cell, summarize
from quietstar.train import train
from quietstar.train_config import TrainConfig

SOURCES = ("sampled", "random", "shifted")
HELDOUT_SEED_OFFSET = 1_000_000  # held-out documents come from another seed's corpus


# ----------------------------------------------------------------------------- the base model
def tiny_lm(hidden: int, layers: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(SCRATCHPAD_WORDS) + 8, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def pretrain_base(out: Path, args: argparse.Namespace) -> Path:
    """Plain next-token training of a fresh tiny Llama on the corpus; saved as a model folder."""
    folder = out / "base"
    if (folder / "config.json").exists():
        return folder
    tokenizer = scratchpad_tokenizer()
    lm = tiny_lm(args.hidden, args.layers, args.seed)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=args.pretrain_lr, weight_decay=0.01)
    docs = iter(scratchpad_corpus(args.pretrain_steps * args.pretrain_batch, args.seed + 1))
    log = []
    for step in range(args.pretrain_steps):
        lr = args.pretrain_lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.pretrain_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = torch.tensor([tokenizer(next(docs)).input_ids[:args.seq_len] for _ in range(args.pretrain_batch)])
        loss = lm(x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        log.append({"step": step + 1, "loss": loss.item(), "lr": lr})
    folder.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "pretrain_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return folder


# ----------------------------------------------------------------------------- measurements
def answer_sites(texts: list[str], tokenizer) -> list[list[tuple[int, str]]]:
    """Per document: (index of the token d, "p q") for every problem; index into input_ids."""
    sites = []
    for text in texts:
        ids, words, doc = tokenizer(text).input_ids, text.split(), []
        assert len(ids) == len(words), "the scratchpad tokenizer maps each word to one token"
        for j, word in enumerate(words):
            if word == "=":
                a, b, c, e = (int(words[j - k]) for k in (7, 5, 3, 1))
                p, q, _ = partial_products(a, b, c, e)
                doc.append((j + 1, f"{p} {q}"))
        sites.append(doc)
    return sites


def answer_nlls(model, texts, sites, seed: int) -> dict[str, np.ndarray]:
    """NLL of every answer token: without a thought and with each thought source."""
    out, document = {}, []
    for source in SOURCES:
        nll = token_nlls(model, texts, max_length=256, batch_size=16, seed=seed, thought_source=source)
        # One window per document: its tokens after the first, in order.
        starts = np.concatenate([[0], np.cumsum(np.bincount(nll.document, minlength=len(texts)))[:-1]])
        index = np.array([starts[d] + j - 1 for d, doc in enumerate(sites) for j, _ in doc])
        out[source], out["without"] = nll.thinking[index], nll.base[index]
        document = nll.document[index]
    out["document"] = document
    return out


@torch.no_grad()
def thought_content(model, texts, sites, seed: int, examples: int = 6) -> dict:
    """Share of sampled thoughts at the "=" before d that are exactly "p q", with examples."""
    tokenizer = model.tokenizer
    generator = torch.Generator().manual_seed(seed)
    hits, shown = [], []
    for start in range(0, len(texts), 16):
        batch = texts[start:start + 16]
        ids = torch.tensor([tokenizer(t).input_ids for t in batch])  # terse documents: one length
        thoughts = model.sample_thoughts(ids, generator=generator)
        for r, doc in enumerate(sites[start:start + 16]):
            for j, useful in doc:
                said = tokenizer.decode(thoughts[r, j - 1]).strip()
                hits.append(said == useful)
                if len(shown) < examples:
                    problem = tokenizer.decode(ids[r, j - 8:j + 1])
                    shown.append({"problem": problem, "thought": said, "partial_products": useful})
    return {"share_exact": float(np.mean(hits)), "n": len(hits), "examples": shown}


def compare(nll: dict[str, np.ndarray], seed: int) -> dict:
    doc = nll["document"]
    pairs = [("sampled", "random"), ("sampled", "shifted"), ("sampled", "without"),
             ("random", "without"), ("shifted", "without")]
    return {"nll": {k: summarize(nll[k], doc, seed) for k in ("without",) + SOURCES},
            "difference": {f"{a} - {b}": summarize(nll[a] - nll[b], doc, seed) for a, b in pairs}}


# ----------------------------------------------------------------------------- the run
def method_config(args) -> QuietStarConfig:
    return QuietStarConfig(
        sampled_thought_tokens=2, ahead_tokens=2, thoughts_per_position=2,
        reward_source="thought", policy_loss_weight=args.policy_loss_weight,
        base_loss_weight=1.0, mixed_loss_weight=1.0, thought_loss_weight=args.thought_loss_weight,
        meta_token_lr_multiplier=args.meta_token_lr_multiplier)


def train_config(args, base: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        model=str(base), data="builtin:scratchpad", num_documents=args.documents, output_dir=str(out),
        seq_len=args.seq_len, batch_size=args.batch_size, micro_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=args.lr, warmup_steps=10, seed=args.seed,
        mixing_head_lr_multiplier=args.mixing_head_lr_multiplier, eval_every=args.steps,
        eval_batches=2, eval_documents=32, sample_every=max(1, args.steps // 4),
        checkpoint_every=args.steps, keep_checkpoints=1, quietstar=method_config(args))


def tables(result: dict) -> str:
    n, d, c = result["nll"], result["difference"], result["content"]
    lines = [f"Held-out: {result['n_documents']} terse documents, {result['n_answers']} answer tokens. "
             "Mean [95% bootstrap CI over documents], nats per answer token.", "",
             "| thoughts | NLL of the answer d |", "|---|---|"]
    lines += [f"| {k} | {format_cell(v)} |" for k, v in n.items()]
    lines += ["", "| difference (negative = the first predicts better) | answer tokens |", "|---|---|"]
    lines += [f"| {k} | {format_cell(v, True)} |" for k, v in d.items()]
    lines += ["", "| thought at the '=' before d is exactly the partial products 'p q' | share |", "|---|---|",
              f"| before Quiet-STaR training (the pretrained base + a fresh head) | {c['before']['share_exact']:.3f} |",
              f"| after | {c['after']['share_exact']:.3f} |", "", "Examples after training:", ""]
    lines += [f"- `{e['problem']}`: thought `{e['thought']}` (partial products `{e['partial_products']}`)"
              for e in c["after"]["examples"]]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=200, help="Quiet-STaR optimiser steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--documents", type=int, default=4000, help="training corpus size (documents)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--mixing-head-lr-multiplier", type=float, default=30.0)
    p.add_argument("--meta-token-lr-multiplier", type=float, default=1.0)
    p.add_argument("--policy-loss-weight", type=float, default=1.0)
    p.add_argument("--thought-loss-weight", type=float, default=0.0)
    p.add_argument("--heldout-documents", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = pretrain_base(out, args)
    heldout = scratchpad_corpus(args.heldout_documents, args.seed + HELDOUT_SEED_OFFSET, worked_fraction=0.0)
    seen = set(scratchpad_corpus(args.documents, args.seed)) | set(
        scratchpad_corpus(args.pretrain_steps * args.pretrain_batch, args.seed + 1))
    if seen & set(heldout):
        raise RuntimeError("a held-out document also occurs in the training data")
    tokenizer = scratchpad_tokenizer()
    sites = answer_sites(heldout, tokenizer)

    fresh = QuietStarForCausalLM.from_base(transformers.AutoModelForCausalLM.from_pretrained(base),
                                           scratchpad_tokenizer(), method_config(args)).eval()
    before = thought_content(fresh, heldout, sites, args.seed)
    result_train = train(train_config(args, base, out / "quietstar"))
    model = QuietStarForCausalLM.from_pretrained(result_train.checkpoint / "model").eval()
    after = thought_content(model, heldout, sites, args.seed)
    nll = answer_nlls(model, heldout, sites, args.seed)
    result = {"command": "python experiments/scratchpad.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)),
              "n_documents": len(heldout), "n_answers": int(nll["document"].size),
              **compare(nll, args.seed), "content": {"before": before, "after": after},
              "train_metrics": result_train.metrics, "elapsed_s": time.time() - t0}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "results.md").write_text(f"# Scratchpad toy, seed {args.seed}\n\n`{result['command']}`\n\n{tables(result)}\n")
    print(tables(result))
    return result


if __name__ == "__main__":
    main()
