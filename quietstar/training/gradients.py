"""The two gradients of ``policy_max_grad_norm``: every micro-batch's NLL and REINFORCE gradients
are accumulated apart (two backward passes), the REINFORCE one is clipped at its own norm, then
the two are summed (the NLL one clipped as usual at ``max_grad_norm``). Each dict maps a
parameter to its gradient."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def hold_apart(params: Iterable[torch.nn.Parameter], into: dict) -> None:
    """Moves every ``.grad`` of ``params`` into ``into`` (added to what it holds there)."""
    for p in params:
        if p.grad is not None:
            into[p] = into[p] + p.grad if p in into else p.grad
            p.grad = None


def put_back(grads: dict) -> None:
    """Sets ``.grad`` to the gradients ``grads`` holds."""
    for p, g in grads.items():
        p.grad = g


def add_back(grads: dict) -> None:
    """Adds the gradients ``grads`` holds to ``.grad``."""
    for p, g in grads.items():
        p.grad = g if p.grad is None else p.grad + g


def clip_policy_apart(params: Callable[[], Iterable[torch.nn.Parameter]], apart: dict[str, dict],
                      max_norm: float) -> float:
    """Clips the policy gradient ``apart["policy"]`` alone at ``max_norm`` and keeps it aside
    there; ``.grad`` becomes the NLL gradient ``apart["nll"]``. Returns the policy gradient's norm
    (before clipping). ``params``: the model's ``parameters`` method."""
    put_back(apart["policy"])
    norm = float(torch.nn.utils.clip_grad_norm_(list(params()), max_norm))
    apart["policy"] = {}
    hold_apart(params(), apart["policy"])
    put_back(apart["nll"])
    return norm
