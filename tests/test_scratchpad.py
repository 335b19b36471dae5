"""The learning machinery end to end on the scratchpad toy (docs/results/scratchpad-dev): a
tiny Llama pretrained on ``builtin:scratchpad`` (tests/fixtures/scratchpad-base, made by
docs/results/scratchpad-dev/pretrain.py, seed 0, worked share 0.8) trained with Quiet-STaR for a
few hundred steps, thinking at the "=" of terse problems, must predict held-out terse answers
better with its own thoughts than with random or shifted ones (the pre-registered confirmation's
configuration, at another seed and fewer steps)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.evaluation import thoughts_for
from quietstar.optim import parameter_groups
from quietstar.scratchpad_corpus import scratchpad_corpus, scratchpad_tokenizer

BASE = Path(__file__).resolve().parent / "fixtures" / "scratchpad-base"
L = 64


def batch(tokenizer, docs) -> torch.Tensor:
    return torch.tensor([tokenizer(d).input_ids[:L] for d in docs])


def answer_sites(x: torch.Tensor, eq: int, semi: int) -> list[tuple[int, int]]:
    """(row, i): position i is the "=" of a terse problem, x[row, i + 1] its answer."""
    return [(b, i) for b in range(x.shape[0]) for i in range(L - 2)
            if x[b, i] == eq and x[b, i + 2] == semi]


def test_own_thoughts_beat_random_and_shifted_after_training():
    torch.manual_seed(5)
    tokenizer = scratchpad_tokenizer()
    eq, semi, dash = (tokenizer.convert_tokens_to_ids(w) for w in ("=", ";", "---"))
    config = QuietStarConfig(sampled_thought_tokens=2, ahead_tokens=2, thoughts_per_position=2,
                             reward_source="thought", policy_loss_weight=1.0, base_loss_weight=1.0,
                             mixed_loss_weight=1.0, thought_loss_weight=0.1, meta_token_lr_multiplier=1.0)
    model = QuietStarForCausalLM.from_base(transformers.AutoModelForCausalLM.from_pretrained(BASE),
                                           tokenizer, config)
    optimizer = torch.optim.AdamW(parameter_groups(model, 3e-4, 0.0, 30.0), lr=3e-4)
    train_docs = iter(scratchpad_corpus(16 * 400, seed=5, worked_fraction=0.8))
    generator = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same numbers on every run
    try:
        model.train()
        for _ in range(400):
            x = batch(tokenizer, [next(train_docs) for _ in range(16)])
            think = torch.zeros_like(x, dtype=torch.bool)  # at the "=" the text does not follow with "---"
            think[:, :-1] = (x[:, :-1] == eq) & (x[:, 1:] != dash)
            out = model(x, generator=generator, thought_positions=think)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        model.eval()
        heldout = batch(tokenizer, scratchpad_corpus(48, seed=10_005, worked_fraction=0.0))
        sites = answer_sites(heldout, eq, semi)
        nll = {}
        with torch.no_grad():
            for source in ("sampled", "random", "shifted"):
                thoughts = thoughts_for(model, heldout, None, 2, source, generator=torch.Generator().manual_seed(1))
                logp = model.score_thoughts(heldout, thoughts).mixed_logits[:, :, 0].float().log_softmax(-1)
                nll[source] = np.array([-logp[b, i, heldout[b, i + 1]].item() for b, i in sites])
    finally:
        torch.set_num_threads(threads)
    own_minus_random = (nll["sampled"] - nll["random"]).mean()
    own_minus_shifted = (nll["sampled"] - nll["shifted"]).mean()
    assert len(sites) > 200
    assert own_minus_random < -0.05 and own_minus_shifted < -0.05, (own_minus_random, own_minus_shifted)
