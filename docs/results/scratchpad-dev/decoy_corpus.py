"""Development corpus: the scratchpad toy with abandoned decoy scratchpads. A worked problem
writes, with equal chance, the partial products (useful: `= --- p q --- d ;`) or the first operands
of the two products with no answer after them (a decoy: `= --- a c --- ;`). A model pretrained on it
writes either kind after "= ---", so a thought opened by START (which starts from "---") holds the
useful content about half as often as it could: REINFORCE can raise that share by choosing the
kind, without learning new facts. The decoy has no answer so that it does not teach the answer in
one step (a decoy followed by d would: it adds nothing to what the text says)."""

import random

from quietstar.scratchpad_corpus import PROBLEMS_PER_DOCUMENT, partial_products


def decoy_problem(rng: random.Random, worked: bool) -> str:
    a, b, c, e = (rng.randrange(10) for _ in range(4))
    p, q, d = partial_products(a, b, c, e)
    if not worked:
        return f"{a} * {b} + {c} * {e} = {d} ;"
    if rng.random() < 0.5:
        return f"{a} * {b} + {c} * {e} = --- {p} {q} --- {d} ;"
    return f"{a} * {b} + {c} * {e} = --- {a} {c} --- ;"


def decoy_corpus(num_documents: int, seed: int, worked_fraction: float) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(num_documents):
        worked = rng.random() < worked_fraction
        docs.append(" ".join(decoy_problem(rng, worked) for _ in range(PROBLEMS_PER_DOCUMENT)))
    return docs
