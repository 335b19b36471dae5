"""The optimiser and learning-rate schedule of ``quietstar train``."""

from __future__ import annotations

import math

import torch

from quietstar.models.modeling import QuietStarForCausalLM
from quietstar.training.config import TrainConfig


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then the schedule."""
    peak, warmup = config.learning_rate, config.warmup_steps
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if config.lr_schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, config.max_steps - warmup)
    floor = peak * config.min_lr_ratio
    if config.lr_schedule == "linear":
        return floor + (peak - floor) * (1 - progress)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at ``lr`` times its ``lr_scale`` (the mixing head's multiplier)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def parameter_groups(model: QuietStarForCausalLM, learning_rate: float, weight_decay: float,
                     mixing_head_lr_multiplier: float = 1.0) -> list[dict]:
    """AdamW parameter groups over the trainable parameters. Matrices are decayed; biases, norm
    weights and the START/END embeddings (stored scaled down, where decay would act 100x too
    strongly) are not. Groups: LM decayed, LM not decayed, head decayed, head not decayed; each
    group's ``lr_scale`` multiplies the scheduled learning rate (the head's is
    ``mixing_head_lr_multiplier``)."""
    meta = model.embedding.scaled_vectors
    head = {id(p) for p in model.mixing_head.parameters()}
    groups = [[], [], [], []]
    for p in model.parameters():
        if p.requires_grad:
            groups[2 * (id(p) in head) + (p.dim() < 2 or p is meta)].append(p)
    scales = (1.0, 1.0, mixing_head_lr_multiplier, mixing_head_lr_multiplier)
    return [{"params": params, "weight_decay": 0.0 if i % 2 else weight_decay,
             "lr_scale": scale, "lr": learning_rate * scale}
            for i, (params, scale) in enumerate(zip(groups, scales))]


def build_optimizer(model: QuietStarForCausalLM, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``parameter_groups`` with the run's learning rate, decay and head multiplier."""
    return torch.optim.AdamW(parameter_groups(model, config.learning_rate, config.weight_decay,
                                              config.mixing_head_lr_multiplier),
                             lr=config.learning_rate)
