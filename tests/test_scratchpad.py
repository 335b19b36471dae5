"""The learning machinery end to end on the scratchpad toy (docs/results/scratchpad-dev): tiny
Llamas pretrained on ``builtin:scratchpad``, trained with Quiet-STaR for a few hundred steps while
thinking at the "=" of terse problems (the pre-registered confirmations' configuration, at other
seeds and fewer steps).

* ``tests/fixtures/scratchpad-base`` (docs/results/scratchpad-dev/pretrain.py, seed 0, worked
  share 0.8): the model must learn to *read* its thoughts, predicting held-out answers better
  with its own thoughts than with random or shifted ones.
* ``tests/fixtures/scratchpad-decoy-base`` (pretrain.py decoy=0.5, seed 0, worked share 0.8, half
  the scratchpads decoys): REINFORCE must make the thoughts *better*, raising the share that hold
  the partial products, which training without REINFORCE does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.evaluation.tasks import thoughts_for
from quietstar.training.optim import parameter_groups
from quietstar.data.scratchpad import partial_products, scratchpad_corpus, scratchpad_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
L = 64
TOKENIZER = scratchpad_tokenizer()
EQ, SEMI, DASH = (TOKENIZER.convert_tokens_to_ids(w) for w in ("=", ";", "---"))
DIGIT = {TOKENIZER.convert_tokens_to_ids(str(d)): d for d in range(10)}


def batch(docs) -> torch.Tensor:
    return torch.tensor([TOKENIZER(d).input_ids[:L] for d in docs])


def answer_sites(x: torch.Tensor) -> list[tuple[int, int]]:
    """(row, i): position i is the "=" of a terse problem, x[row, i + 1] its answer."""
    return [(b, i) for b in range(x.shape[0]) for i in range(L - 2) if x[b, i] == EQ and x[b, i + 2] == SEMI]


def trained(base: str, steps: int, seed: int, policy_loss_weight: float = 1.0, decoy_fraction: float = 0.0):
    """The base trained ``steps`` steps of 16 documents, thinking at the "=" the text does not
    follow with "---" (terse problems), one thread (the same numbers on every run)."""
    torch.manual_seed(seed)
    config = QuietStarConfig(sampled_thought_tokens=2, ahead_tokens=2, thoughts_per_position=2,
                             reward_source="thought", policy_loss_weight=policy_loss_weight,
                             base_loss_weight=1.0, mixed_loss_weight=1.0, thought_loss_weight=0.1,
                             meta_token_lr_multiplier=1.0)
    model = QuietStarForCausalLM.from_base(transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / base),
                                           TOKENIZER, config)
    optimizer = torch.optim.AdamW(parameter_groups(model, 3e-4, 0.0, 30.0), lr=3e-4)
    docs = iter(scratchpad_corpus(16 * steps, seed=seed, worked_fraction=0.8, decoy_fraction=decoy_fraction))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = batch([next(docs) for _ in range(16)])
        think = torch.zeros_like(x, dtype=torch.bool)
        think[:, :-1] = (x[:, :-1] == EQ) & (x[:, 1:] != DASH)
        out = model(x, generator=generator, thought_positions=think)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval()


def one_thread(test):
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            test()
        finally:
            torch.set_num_threads(threads)
    run.__name__, run.__doc__ = test.__name__, test.__doc__
    return run


@one_thread
def test_own_thoughts_beat_random_and_shifted_after_training():
    model = trained("scratchpad-base", steps=400, seed=5)
    heldout = batch(scratchpad_corpus(48, seed=10_005, worked_fraction=0.0))
    sites = answer_sites(heldout)
    nll = {}
    with torch.no_grad():
        for source in ("sampled", "random", "shifted"):
            thoughts = thoughts_for(model, heldout, None, 2, source, generator=torch.Generator().manual_seed(1))
            logp = model.score_thoughts(heldout, thoughts).mixed_logits[:, :, 0].float().log_softmax(-1)
            nll[source] = np.array([-logp[b, i, heldout[b, i + 1]].item() for b, i in sites])
    own_minus_random = (nll["sampled"] - nll["random"]).mean()
    own_minus_shifted = (nll["sampled"] - nll["shifted"]).mean()
    assert len(sites) > 200
    assert own_minus_random < -0.05 and own_minus_shifted < -0.05, (own_minus_random, own_minus_shifted)


def share_of_partial_products(model, heldout: torch.Tensor) -> float:
    """How often a sampled thought at a terse "=" is exactly the partial products "p q"."""
    with torch.no_grad():
        thoughts = thoughts_for(model, heldout, None, 2, "sampled", generator=torch.Generator().manual_seed(1))
    hits = []
    for b, i in answer_sites(heldout):
        a, bb, c, e = (DIGIT[int(heldout[b, i - j])] for j in (7, 5, 3, 1))
        p, q, _ = partial_products(a, bb, c, e)
        hits.append(TOKENIZER.decode(thoughts[b, i]) == f"{p} {q}")
    return float(np.mean(hits))


@one_thread
def test_reinforce_moves_the_thoughts_to_the_partial_products():
    heldout = batch(scratchpad_corpus(48, seed=10_005, worked_fraction=0.0))
    base = trained("scratchpad-decoy-base", steps=0, seed=5)
    before = share_of_partial_products(base, heldout)
    after = share_of_partial_products(trained("scratchpad-decoy-base", 100, 5, decoy_fraction=0.5), heldout)
    without_reinforce = share_of_partial_products(
        trained("scratchpad-decoy-base", 100, 5, policy_loss_weight=0.0, decoy_fraction=0.5), heldout)
    assert 0.2 < before < 0.6  # decoys and wrong products share the rest
    assert after > before + 0.25, (before, after)
    assert without_reinforce < after - 0.2, (without_reinforce, after)
