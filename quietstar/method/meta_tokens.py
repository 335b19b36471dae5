"""The learned <|startofthought|> / <|endofthought|> tokens.

The base model's embedding matrix is left untouched; the two meta vectors live in their own small
parameter and are spliced in by ``MetaTokenEmbedding``. They are stored divided by the learning-
rate multiplier and multiplied back when used: under Adam the update size does not depend on the
gradient's scale, so this makes them learn ``multiplier`` times faster with any optimiser setup.
"""

from __future__ import annotations

import torch
from torch import nn

from quietstar.utils.errors import QuietStarInputError


# Where a tokenizer records the meta tokens this library added to it (saved with it, in
# tokenizer_config.json), so that wrapping it again, saved or not, reuses them.
META_TOKENS_KEY = "quietstar_meta_tokens"


def add_meta_tokens(tokenizer, start: str, end: str, *, saved: bool = False) -> tuple[int, int]:
    """Adds START/END as new special tokens and returns their ids.

    A string the tokenizer already knows (its EOS, any vocabulary or added token) is refused:
    the meta tokens get embeddings of their own, and a token the text already uses would be
    taken for a thought boundary. Accepted again are the tokens an earlier call added: an added
    special token of exactly that string that the tokenizer records as added by quietstar
    (``META_TOKENS_KEY``), or, with ``saved=True`` (a tokenizer of a saved QuietStar folder,
    also one saved before that record existed), any added special token of exactly that string.
    """
    if tokenizer.pad_token_id is None:
        raise QuietStarInputError(
            "the tokenizer has no pad token; set one before wrapping, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token` (padding is masked out of the loss)")
    vocab = tokenizer.get_vocab()
    ours = list(tokenizer.init_kwargs.get(META_TOKENS_KEY) or [])
    missing = []
    for field, token in (("start_thought_token", start), ("end_thought_token", end)):
        if token not in vocab:
            missing.append(token)
            continue
        added = tokenizer.added_tokens_decoder.get(vocab[token])
        if added is not None and added.content == token and added.special and (saved or token in ours):
            continue  # the meta token this library added before
        raise QuietStarInputError(
            f"{field} {token!r} is already a token of the tokenizer (id {vocab[token]}"
            + (", its EOS token" if token == tokenizer.eos_token else "")
            + "); the thought tokens must be new strings, not in its vocabulary: choose another "
              "start_thought_token / end_thought_token (defaults '<|startofthought|>' and "
              "'<|endofthought|>')")
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing},
                                     replace_extra_special_tokens=False)
    tokenizer.init_kwargs[META_TOKENS_KEY] = ours + [t for t in (start, end) if t not in ours]
    ids = tokenizer.convert_tokens_to_ids([start, end])
    for token, idx in zip((start, end), ids):
        encoded = tokenizer(token, add_special_tokens=False).input_ids
        if idx is None or encoded != [idx]:
            raise QuietStarInputError(f"the tokenizer does not encode {token!r} as one token (got {encoded}); "
                                      "it cannot hold quietstar's meta tokens")
    return ids[0], ids[1]


def meta_token_init_vector(tokenizer, embedding: nn.Module, text: str) -> torch.Tensor:
    """[d] float32: the vector START and END start from, the input embedding of ``text``'s first
    token (``QuietStarConfig.meta_token_init``)."""
    init_ids = tokenizer(text, add_special_tokens=False).input_ids
    if not init_ids:
        raise QuietStarInputError(f"meta_token_init {text!r} encodes to no token")
    with torch.no_grad():
        return embedding(torch.tensor([init_ids[0]], device=embedding.weight.device))[0].float()


class MetaTokenEmbedding(nn.Module):
    """The base input embedding with the two meta-token rows replaced by learned vectors.

    Calling it on any ids returns exactly the vectors fed to the LM (as ``inputs_embeds``).
    """

    def __init__(self, base: nn.Module, start_id: int, end_id: int, init_vector: torch.Tensor,
                 lr_multiplier: float):
        super().__init__()
        self.base = base
        self.start_id, self.end_id = start_id, end_id
        self.lr_multiplier = lr_multiplier
        self.scaled_vectors = nn.Parameter(init_vector.detach().clone().expand(2, -1).contiguous()
                                           / lr_multiplier)

    @property
    def meta_vectors(self) -> torch.Tensor:
        """[2, d]: the START and END vectors as fed to the LM."""
        return self.scaled_vectors * self.lr_multiplier

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_start, is_end = ids == self.start_id, ids == self.end_id
        is_meta = is_start | is_end
        # Meta ids may lie beyond the base matrix: look up a harmless id there, then overwrite.
        out = self.base(ids.masked_fill(is_meta, 0))
        meta = self.meta_vectors.to(out.dtype)[is_end.long()]
        return torch.where(is_meta.unsqueeze(-1), meta, out)
