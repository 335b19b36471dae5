"""The mixing head: how much to trust the post-thought prediction over the base one."""

from __future__ import annotations

import torch
from torch import nn


class MixingHead(nn.Module):
    """MLP over [base hidden, post-thought hidden] -> mixing weight w, one per prediction.

    The mixed hidden state is ``h_base + w * (h_thought - h_base)`` and, the LM head being linear,
    its logits are the same interpolation of the two logits. The last layer starts at zero, so
    w = 0 and the model starts as exactly the base model; ``bias=False`` leaves its bias out, as
    the reference code does.
    """

    def __init__(self, hidden_size: int, mlp_hidden_size: int | None = None, bounded: bool = False,
                 *, bias: bool = True):
        super().__init__()
        width = mlp_hidden_size or hidden_size
        self.bounded = bounded
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden_size, width), nn.ReLU(),
            nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, 1, bias=bias),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        if bias:
            nn.init.zeros_(self.mlp[-1].bias)

    def weight(self, base_hidden: torch.Tensor, thought_hidden: torch.Tensor) -> torch.Tensor:
        """Mixing weight, shape ``base_hidden.shape[:-1]``."""
        features = torch.cat([base_hidden, thought_hidden], dim=-1).to(self.mlp[0].weight.dtype)
        w = self.mlp(features).squeeze(-1)
        return torch.tanh(w) if self.bounded else w

    def forward(self, base_hidden: torch.Tensor, thought_hidden: torch.Tensor):
        """Returns (mixed hidden, mixing weight)."""
        w = self.weight(base_hidden, thought_hidden)
        mixed = base_hidden + w.unsqueeze(-1).to(base_hidden.dtype) * (thought_hidden - base_hidden)
        return mixed, w
