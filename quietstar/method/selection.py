"""Which positions think: a share of them, chosen by the base prediction's entropy or at random.

The paper's finding is that thoughts help the difficult tokens most, so a rollout may think at a
chosen share of the positions only (``QuietStarConfig.thought_fraction``). The text pass still
runs over all L tokens; every later pass runs over the S selected positions' rows alone, each
row attending to its own text prefix and its own thought (``ThoughtRows`` is the bookkeeping).
The one place that chooses: training (``thought_rows_chooser``, over the positions with a target)
and inference (``inference_chooser``, over the positions with a next token) both call
``select_positions`` on the entropy of the rollout's own text pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quietstar.utils.errors import QuietStarInputError

SELECTIONS = ("entropy", "random")


@torch.no_grad()
def logits_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) [..., V] -> [...]; -inf logits (the meta tokens) have
    probability 0 and add nothing."""
    return torch.special.entr(logits.float().softmax(-1)).sum(-1)


def next_token_candidates(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the real positions whose next token is real too, the ones a thought there
    helps predict (what training's targets count as valid when nothing is ignored)."""
    real = attention_mask.bool()
    return real & torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], 1)


def check_thought_fraction(fraction) -> None:
    """Refuses a thought fraction outside (0, 1]."""
    if not 0 < fraction <= 1:
        raise QuietStarInputError(f"thought_fraction must be in (0, 1] (1 = every position thinks), got {fraction}")


def select_positions(candidates: torch.Tensor, fraction: float, how: str,
                     entropy: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, *, count: int | None = None) -> torch.Tensor:
    """The positions that think, [B, L] bool: in each row b, the round(fraction * c_b) (at least
    one; or min(``count``, c_b) when a count is given) of its c_b ``candidates`` [B, L] with the
    highest score, where the score is ``entropy``
    [B, L] (how="entropy": the base prediction is least sure there) or a uniform random number
    drawn from ``generator`` (how="random": the unbiased control). Ties go to the earlier position."""
    if how not in SELECTIONS:
        raise QuietStarInputError(f"thought selection must be one of {SELECTIONS}, got {how!r}")
    B, L = candidates.shape
    if how == "entropy":
        if entropy is None:
            raise QuietStarInputError("entropy selection needs the base prediction's entropy [B, L]")
        score = entropy.float()
    else:
        score = torch.rand(B, L, generator=generator, device=candidates.device)
    score = score.masked_fill(~candidates, float("-inf"))
    available = candidates.sum(1)                                             # [B]
    if count is None:
        chosen = torch.round(available * fraction).clamp(min=1).minimum(available)  # [B]
    else:
        chosen = available.clamp(max=count)                                       # [B]
    order = torch.sort(score, dim=1, descending=True, stable=True).indices     # [B, L]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=order.device).expand(B, L))
    return (rank < chosen[:, None]) & candidates


@dataclass
class ThoughtRows:
    """The thinking positions of a batch as rows: S per sequence, S the batch's largest count,
    shorter rows padded (``valid`` False, ``index`` 0: computed like any row, never read)."""

    index: torch.Tensor  # [B, S] long: the text position of each row, in text order
    valid: torch.Tensor  # [B, S] bool: False on padding rows

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "ThoughtRows":
        """Rows of the True entries of ``mask`` [B, L] bool (S >= 1 even if none is True)."""
        count = mask.sum(1)                                                    # [B]
        S = max(int(count.max()), 1) if mask.numel() else 1
        # A stable sort on "not selected" puts the selected positions first, in text order.
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :S]  # [B, S]
        valid = torch.arange(S, device=mask.device)[None, :] < count[:, None]
        return cls(order.masked_fill(~valid, 0), valid)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, ...] -> [B, S, ...] at the rows' positions."""
        return x[torch.arange(x.shape[0], device=x.device)[:, None], self.index]

    def scatter(self, x: torch.Tensor, length: int, fill=0) -> torch.Tensor:
        """x [B, S, ...] -> [B, length, ...]: each valid row at its position, ``fill`` elsewhere
        (differentiable in x)."""
        return self.put(x, x.new_full((x.shape[0], length, *x.shape[2:]), fill))

    def put(self, x: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """A copy of ``into`` [B, L, ...] with each valid row of x [B, S, ...] at its position
        (differentiable in both)."""
        batch = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(self.index)
        return into.index_put((batch[self.valid], self.index[self.valid]), x[self.valid])

    def mask(self, length: int) -> torch.Tensor:
        """The thinking positions as [B, length] bool."""
        return self.scatter(self.valid, length, False)

    def repeat_interleave(self, n: int) -> "ThoughtRows":
        """The rows of a batch whose sequences are each repeated n times (adjacent)."""
        return ThoughtRows(self.index.repeat_interleave(n, 0), self.valid.repeat_interleave(n, 0))


def check_thought_positions(thought_positions, input_ids: torch.Tensor) -> None:
    """Refuses a ``thought_positions`` argument that is not None or a [B, L] bool tensor."""
    if thought_positions is None:
        return
    if (not isinstance(thought_positions, torch.Tensor) or thought_positions.dtype != torch.bool
            or thought_positions.shape != input_ids.shape):
        got = (f"{thought_positions.dtype} {tuple(thought_positions.shape)}"
               if isinstance(thought_positions, torch.Tensor) else type(thought_positions).__name__)
        raise QuietStarInputError(f"thought_positions must be a bool tensor [batch, length] = "
                                  f"{list(input_ids.shape)} (True = think there), got {got}")


def thought_rows_chooser(entropy_fn, candidates: torch.Tensor, thought_positions: torch.Tensor | None,
                         n: int, fraction: float, how: str, generator: torch.Generator | None, *,
                         count: int | None = None):
    """How a training forward picks the positions that think: None when all do (fraction 1, no
    ``count``, no ``thought_positions``: the paper), else a function of the text pass's final hidden states
    [B*n, L, d] (the n copies of a text adjacent) -> ThoughtRows. ``entropy_fn`` maps final
    hidden states [B, L, d] to the base prediction's entropy [B, L] (``vocab.VocabHead.entropy``,
    chunked). Only ``candidates`` [B, L]
    (positions with a target) are chosen, and the n copies of a text think at the same positions:
    ``thought_positions`` [B, L] if given, else ``count`` (per sequence) or ``fraction`` of them
    by ``how``."""
    if thought_positions is not None:
        rows = ThoughtRows.from_mask(thought_positions & candidates).repeat_interleave(n)
        return lambda hidden: rows
    if fraction == 1.0 and count is None:
        return None

    def choose(hidden: torch.Tensor) -> ThoughtRows:
        entropy = entropy_fn(hidden[::n]) if how == "entropy" else None
        chosen = select_positions(candidates, fraction, how, entropy, generator, count=count)
        return ThoughtRows.from_mask(chosen).repeat_interleave(n)
    return choose


def inference_chooser(entropy_fn, attention_mask: torch.Tensor, thought_positions: torch.Tensor | None,
                      fraction: float | None, how: str, generator: torch.Generator | None):
    """How an inference rollout (``think``, ``sample_thoughts``) picks the positions that think:
    None when all do (no ``thought_positions``; ``fraction`` None or 1), else a function of the
    text pass's final hidden states [B, L, d] -> ThoughtRows. Given ``thought_positions`` [B, L]
    win (where the text is real); else ``fraction`` of the ``next_token_candidates`` by ``how``,
    through ``thought_rows_chooser`` as in training."""
    if fraction is not None:
        check_thought_fraction(fraction)
    if thought_positions is not None:
        rows = ThoughtRows.from_mask(thought_positions & attention_mask.bool())
        return lambda hidden: rows
    if fraction is None:
        return None
    return thought_rows_chooser(entropy_fn, next_token_candidates(attention_mask), None, 1, fraction, how, generator)
