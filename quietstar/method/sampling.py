"""Choosing tokens from logits: greedy, temperature, top-k and top-p sampling."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Sets to -inf every logit outside the top-k tokens and outside the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (always at least one token), as in transformers' ``TopPLogitsWarper``.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None,
           top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Token ids [B] from logits [B, V]: greedy at temperature 0, else sampled from
    softmax(logits / temperature) restricted to the top-k / top-p tokens."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature if temperature != 1 else logits.float(), top_k, top_p)
    uniforms = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device)
    return inverse_cdf(logits, uniforms)


def inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids [B] from softmax(logits) [B, V], row b at its uniform number ``uniforms`` [B, 1]
    (rows are independent, so ``vocab.VocabHead`` samples a chunk of rows at a time).

    Inverse-CDF sampling: on CPU this is ~10x faster than torch.multinomial over a large
    vocabulary, and a zero-probability token (a meta token, one outside top-k/top-p) can never
    be drawn: the CDF does not rise there."""
    cdf = logits.softmax(-1).cumsum_(-1)
    u = uniforms * cdf[:, -1:]
    # NaN logits would index past the vocabulary; clamp so the NaN surfaces in the loss instead.
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
