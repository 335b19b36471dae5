"""Development corpus of the decoy runs: ``builtin:scratchpad`` with half the worked problems
abandoned decoys (``scratchpad_corpus(..., decoy_fraction=0.5)``, see quietstar/scratchpad_corpus.py).
The runs recorded here used an earlier copy of the same generator; it gave the same documents
(checked for several seeds) before this call replaced it."""

from quietstar.scratchpad_corpus import scratchpad_corpus, scratchpad_problem


def decoy_problem(rng, worked: bool) -> str:
    return scratchpad_problem(rng, worked, decoy_fraction=0.5)


def decoy_corpus(num_documents: int, seed: int, worked_fraction: float) -> list[str]:
    return scratchpad_corpus(num_documents, seed, worked_fraction=worked_fraction, decoy_fraction=0.5)
