"""The built-in corpus ``builtin:scratchpad``: a toy whose hard tokens follow from intermediate
results that a thought can write out.

Every problem is ``a * b + c * e = d`` in single digits, modulo 10: ``d = (p + q) % 10`` with the
partial products ``p = a * b % 10`` and ``q = c * e % 10``. A document holds 8 problems, all
written one of two ways:

    worked   7 * 8 + 3 * 4 = --- 6 2 --- 8 ;     the partial products on a scratchpad
    terse    7 * 8 + 3 * 4 = 8 ;                 the answer alone

A small model learns the worked steps (each a 100-entry table) long before it learns the terse
answer in one step (a 10,000-entry table). On terse text a thought ``<START> p q <END>`` can
do what the worked text does, and it has a head start: the scratchpad is marked with "---", the
string the START and END embeddings begin from (``QuietStarConfig.meta_token_init``), so a thought
opens where a model trained on worked text has learnt to write the partial products. In the
runs on it (docs/results/scratchpad-dev) a tiny model's own thoughts beat random and shifted ones
on held-out terse answers, though training did not make the thoughts themselves better.

With ``decoy_fraction`` > 0 a worked problem is, with that chance, an abandoned *decoy* instead:

    decoy    7 * 8 + 3 * 4 = --- 7 3 --- ;       the first operands, and no answer

A model pretrained on such text writes either kind after "= ---", so its thoughts hold the useful
content only part of the time, though it can compute it: REINFORCE can raise that share by
choosing the kind, without learning new facts (docs/results/scratchpad-dev, "decoys"). The decoy
has no answer so that it does not teach the answer in one step, as a decoy followed by d would.

The words are single tokens of ``scratchpad_tokenizer()`` (a word-level tokenizer, no hub).
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, models, pre_tokenizers

from quietstar.utils.errors import QuietStarInputError

SCRATCHPAD_WORDS = ["<pad>", "<eos>", "---"] + [str(d) for d in range(10)] + ["*", "+", "=", ";"]
PROBLEMS_PER_DOCUMENT = 8


def partial_products(a: int, b: int, c: int, e: int) -> tuple[int, int, int]:
    """(p, q, d) of the problem ``a * b + c * e``: the two partial products and the answer."""
    p, q = a * b % 10, c * e % 10
    return p, q, (p + q) % 10


def scratchpad_problem(rng: random.Random, worked: bool, decoy_fraction: float = 0.0) -> str:
    a, b, c, e = (rng.randrange(10) for _ in range(4))
    p, q, d = partial_products(a, b, c, e)
    # a draw only when decoys are on, so the default corpus stays the same numbers
    if worked and decoy_fraction > 0 and rng.random() >= 1.0 - decoy_fraction:
        return f"{a} * {b} + {c} * {e} = --- {a} {c} --- ;"
    pad = f"--- {p} {q} --- " if worked else ""
    return f"{a} * {b} + {c} * {e} = {pad}{d} ;"


def scratchpad_corpus(num_documents: int, seed: int, worked_fraction: float = 0.5,
                      problems: int = PROBLEMS_PER_DOCUMENT, decoy_fraction: float = 0.0) -> list[str]:
    """``num_documents`` documents of ``problems`` problems each; a document is worked with
    probability ``worked_fraction``, else terse, and a worked problem a decoy with probability
    ``decoy_fraction``. Deterministic per ``seed`` (a private RNG)."""
    for name, value in (("worked_fraction", worked_fraction), ("decoy_fraction", decoy_fraction)):
        if not 0.0 <= value <= 1.0:
            raise QuietStarInputError(f"{name} must be in [0, 1], got {value}")
    rng = random.Random(seed)
    docs = []
    for _ in range(num_documents):
        worked = rng.random() < worked_fraction
        docs.append(" ".join(scratchpad_problem(rng, worked, decoy_fraction) for _ in range(problems)))
    return docs


def scratchpad_tokenizer():
    """A word-level tokenizer over ``SCRATCHPAD_WORDS`` (pad and eos included)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SCRATCHPAD_WORDS)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
