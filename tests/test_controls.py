"""quietstar.method.controls.shifted_thoughts: the shifted control moves each document's own
thoughts among that document's thinking positions, never to or from padding or a position that
does not think."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, random_text
from quietstar.method.controls import shifted_thoughts
from quietstar.utils.batching import pad_sequences

K = 3


def _batch(lengths, side):
    rows = [random_text(1, n, seed=10 + b)[0].tolist() for b, n in enumerate(lengths)]
    return pad_sequences(rows, 0, side, "cpu")


def _expected(own, thinking):
    """The reference, one document at a time: its thinking positions p_0 < .. < p_{S-1}; p_r
    takes the thought of p_{(r + S // 2) mod S}."""
    out = torch.full_like(own, -1)
    for b in range(own.shape[0]):
        p = thinking[b].nonzero().squeeze(1).tolist()
        S = len(p)
        for r, i in enumerate(p):
            out[b, i] = own[b, p[(r + S // 2) % S]]
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_shifted_thoughts_at_chosen_positions_of_a_padded_batch_come_from_the_same_documents_thinking_positions(side):
    """Thoughts at chosen positions in a padded batch (B > 1): the shifted thought of a chosen
    position is the own thought (same generator, same positions) of the chosen position half the
    document's chosen positions further on, cyclically; the position L/2 on in the padded row
    would be padding (a thought of pad ids) or a position that never thought."""
    model = make_model()
    ids, mask = _batch([10, 6], side)
    pad_id = model.tokenizer.pad_token_id
    ids = ids.masked_fill(mask == 0, pad_id)
    real = mask.bool()
    chosen = torch.zeros_like(real)
    chosen[0, [1, 4, 8]] = True
    first = 0 if side == "right" else 4  # the short document's first real position
    chosen[1, [first, first + 2, first + 3]] = True  # L/2 = 5 on from the last two: padding
    own = model.sample_thoughts(ids, mask, num_tokens=K, generator=torch.Generator().manual_seed(0),
                                thought_positions=chosen)
    shifted = shifted_thoughts(model, ids, mask, num_tokens=K, generator=torch.Generator().manual_seed(0),
                               thought_positions=chosen)
    assert not (shifted[chosen] == pad_id).all(-1).any(), "a shifted thought came from a position that did not think"
    assert torch.equal(shifted[chosen], _expected(own, chosen)[chosen])
    assert (shifted[~chosen] == pad_id).all()
    # the permutation moved every thought here (three per document): none is its own
    assert not (shifted[chosen] == own[chosen]).all(-1).any()


def test_every_position_thinking_in_a_padded_batch_shifts_within_each_documents_real_positions():
    """Without thought_positions every real position thinks: a short document's thoughts are
    shifted by half its own length, not by half the padded row; unpadded, that is the roll by L/2."""
    model = make_model()
    ids, mask = _batch([10, 7], "right")
    ids = ids.masked_fill(mask == 0, model.tokenizer.pad_token_id)
    own = model.sample_thoughts(ids, mask, num_tokens=K, generator=torch.Generator().manual_seed(1))
    shifted = shifted_thoughts(model, ids, mask, num_tokens=K, generator=torch.Generator().manual_seed(1))
    real = mask.bool()
    assert torch.equal(shifted[real], _expected(own, real)[real])
    assert torch.equal(shifted[0], torch.roll(own[0], shifts=-5, dims=0))  # the full row: as before


def test_a_document_with_one_thinking_position_keeps_its_own_thought():
    """No other thought of the document exists to take: the position keeps its own (own - shifted
    is 0 there, which understates the content's effect and never inflates it); a document with
    none gets none."""
    model = make_model()
    ids, mask = _batch([8, 8, 8], "right")
    chosen = torch.zeros_like(mask, dtype=torch.bool)
    chosen[0, 3] = True
    chosen[1, [2, 6]] = True
    own = model.sample_thoughts(ids, mask, num_tokens=K, generator=torch.Generator().manual_seed(2),
                                thought_positions=chosen)
    shifted = shifted_thoughts(model, ids, mask, num_tokens=K, generator=torch.Generator().manual_seed(2),
                               thought_positions=chosen)
    assert torch.equal(shifted[0, 3], own[0, 3])
    assert torch.equal(shifted[1, 2], own[1, 6]) and torch.equal(shifted[1, 6], own[1, 2])
    assert (shifted[2] == model.tokenizer.pad_token_id).all()
