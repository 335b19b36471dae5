"""A loss whose gradient is computed ahead, piece by piece: exact, with one piece's graph alive.

A loss that is a sum of pieces, each with its own graph (the thoughts of a few positions), and a
shared part (the text pass) they all read, can be differentiated a piece at a time: the shared
part's outputs are detached into leaves, each piece's gradient with respect to the parameters and
those leaves is taken (``HeldGradients.add``) and its graph freed, and the sum is attached to the
loss's value (``HeldGradients.attach``). The loss's backward then hands the held gradients, times
its incoming gradient, to the parameters and to the shared part's real outputs, whose own graph
carries them on: the same gradients as one backward of the whole, any loss scaling or
accumulation included, at the memory of the shared graph plus one piece's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class HeldGradients:
    """The summed gradients of pieces of a loss with respect to ``tensors`` (parameters, leaves)."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)
        self.grads: list[torch.Tensor | None] = [None] * len(self.tensors)

    def add(self, piece: torch.Tensor) -> None:
        """Adds the gradient of the scalar ``piece`` and frees its graph (nothing without one)."""
        if not piece.requires_grad:
            return
        grads = torch.autograd.grad(piece, self.tensors, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                self.grads[i] = g if self.grads[i] is None else self.grads[i] + g

    def attach(self, value: torch.Tensor, targets: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """``value`` (the loss's value, scalar) with a backward that gives each tensor its held
        gradient times the incoming one; ``targets`` (default the tensors themselves) receive them
        instead, one per tensor: for a detached leaf, the real output it was detached from."""
        targets = self.tensors if targets is None else list(targets)
        kept = [(t, g) for t, g in zip(targets, self.grads, strict=True) if g is not None]
        if not kept or not torch.is_grad_enabled():
            return value.detach()
        return _Held.apply(value.detach(), tuple(g for _, g in kept), *(t for t, _ in kept))


class _Held(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, grads, *tensors):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return (None, None, *((g * grad_out).to(g.dtype) for g in ctx.grads))
