"""What a base LM and this machine can take, checked before any work: the LM's position ids and
the memory of a training step.

Positions. A thought after position p continues the text's positions (p+1 .. p+k+2, then the
teacher-forced tokens), so a text of L tokens needs more position ids than L
(``rollout.rollout_positions``, ``generation.generation_positions``). Past the LM's
``max_position_embeddings`` a model with learned absolute positions (GPT-2) has no embedding at
all, and a rotary model computes but was never trained there (its predictions degrade): both are
refused, the rotary one unless ``QuietStarConfig.allow_position_extrapolation`` says otherwise.
``check_positions`` is the one rule; ``QuietStarForCausalLM.check_positions`` applies it to its
LM, the commands to the LM's config before loading it.

Memory. ``training_memory`` is a rough lower bound of what a training step keeps for its backward
pass, from the LM's config alone (so before the model loads); ``check_training_memory`` refuses a
run whose bound exceeds the memory available on its device (``available_memory``): such a run
would die in the allocator, or swap for minutes first.
"""

from __future__ import annotations

import torch

from quietstar.method.config import QuietStarConfig
from quietstar.method.rollout import rollout_positions
from quietstar.utils.errors import QuietStarInputError

GIB = 2 ** 30
SHORTER = "--seq-len in training, --max-new-tokens in generation"
# Values of the hidden size that every decoder layer keeps per token for the backward pass, at
# least: its input, the normalised input, the attention's output, the MLP's input, and four more
# in the attention and MLP projections. Measured: ~21 for a Llama layer (intermediate = 2 x
# hidden), ~29 with 4 x hidden, ~44 for GPT-2; so 8 underestimates every common architecture.
# With activation checkpointing a layer keeps its input alone.
VALUES_PER_LAYER = 8
VALUES_PER_CHECKPOINTED_LAYER = 1


def position_limit(lm_config) -> tuple[int | None, bool]:
    """(the LM's number of positions, or None where it has no limit; whether its positions are
    rotary) from its transformers config."""
    text = lm_config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    rotary = getattr(text, "rope_parameters", None) is not None or getattr(text, "rope_theta", None) is not None
    return limit, rotary


def check_positions(lm_config, positions: int, what: str, allow_extrapolation: bool,
                    model_name: str | None = None) -> None:
    """Refuses ``what``, which needs position ids 0..positions-1, where they go past the LM's
    ``max_position_embeddings``; a rotary LM may go past them when ``allow_extrapolation``.
    ``model_name`` names the LM in the message (default: its config's architecture)."""
    limit, rotary = position_limit(lm_config)
    if limit is None or positions <= limit:
        return
    message = (f"{what} needs position ids up to {positions - 1}, but {model_name or _model_name(lm_config)} "
               f"has {limit} positions (max_position_embeddings)")
    if not rotary:
        raise QuietStarInputError(f"{message}: its learned position embeddings end there; shorten the text "
                                  f"({SHORTER}), or use fewer thought or ahead tokens")
    if not allow_extrapolation:
        raise QuietStarInputError(
            f"{message}: its rotary positions were never trained there and its predictions degrade; shorten "
            f"the text ({SHORTER}) or use fewer thought or ahead tokens, or opt in with "
            "allow_position_extrapolation (QuietStarConfig; --allow-position-extrapolation for "
            "quietstar train and generate)")


def _model_name(lm_config) -> str:
    architectures = getattr(lm_config, "architectures", None) or []
    return architectures[0] if architectures else f"the {lm_config.model_type} model"


def check_training_positions(lm_config, config: QuietStarConfig, seq_len: int, *, prefix_tokens: int) -> None:
    """``check_positions`` for training on ``seq_len``-token sequences with ``config``'s k and A,
    each thought opened by its ``prefix_tokens``-token thought_prefix (as the model counts them:
    ``QuietStarConfig.thought_prefix_ids``)."""
    k, A, m = config.sampled_thought_tokens, config.ahead_tokens, prefix_tokens
    what = f"training on seq_len {seq_len} with k={k}, A={A}" + (f" after a {m}-token thought_prefix" if m else "")
    check_positions(lm_config, rollout_positions(seq_len, m + k, A), what, config.allow_position_extrapolation)


def training_memory(lm_config, config: QuietStarConfig, *, seq_len: int, micro_batch_size: int,
                    bytes_per_value: int, activation_checkpointing: bool) -> int:
    """A lower bound, in bytes, of the activations one training forward keeps for its backward
    pass: the rows it runs (micro_batch_size x n thoughts x (seq_len text rows + F - 1 thought
    passes over the thinking rows)) x hidden size x layers x ``VALUES_PER_LAYER`` x
    ``bytes_per_value``, plus the vocabulary-sized logits of one chunk (``loss_chunk_tokens``), or
    of every base and mixed prediction when that is 0 (kept for the backward). The weights and
    optimiser state come on top."""
    text = lm_config.get_text_config()
    n, A = config.thoughts_per_position, config.ahead_tokens
    thinking = max(1, round(config.thought_fraction * seq_len))  # the rows of passes 1..F-1
    rows = micro_batch_size * n * (seq_len + (config.passes_per_step - 1) * thinking)
    per_layer = VALUES_PER_CHECKPOINTED_LAYER if activation_checkpointing else VALUES_PER_LAYER
    activations = rows * text.hidden_size * text.num_hidden_layers * per_layer * bytes_per_value
    logit_rows = config.loss_chunk_tokens or micro_batch_size * n * (seq_len + thinking * A)
    return activations + logit_rows * text.vocab_size * bytes_per_value


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes free for a new allocation on ``device``, where that figure comes from), or None
    where it cannot be known: a CUDA device's free memory, else the machine's MemAvailable
    (Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_training_memory(lm_config, config: QuietStarConfig, *, seq_len: int, micro_batch_size: int,
                          device: torch.device, bf16: bool, activation_checkpointing: bool,
                          processes_sharing: int = 1) -> None:
    """Refuses a training step whose ``training_memory`` exceeds the memory available on
    ``device`` (shared by ``processes_sharing`` processes), naming both and what to lower."""
    available = available_memory(device)
    if available is None:
        return
    free, source = available
    free //= processes_sharing
    need = training_memory(lm_config, config, seq_len=seq_len, micro_batch_size=micro_batch_size,
                           bytes_per_value=2 if bf16 else 4, activation_checkpointing=activation_checkpointing)
    if need <= free:
        return
    text = lm_config.get_text_config()
    per_layer = VALUES_PER_CHECKPOINTED_LAYER if activation_checkpointing else VALUES_PER_LAYER
    share = f" (a 1/{processes_sharing} share)" if processes_sharing > 1 else ""
    raise QuietStarInputError(
        f"a training step on seq_len {seq_len} with micro_batch_size {micro_batch_size}, "
        f"n={config.thoughts_per_position} thoughts and F={config.passes_per_step} passes "
        f"(k={config.sampled_thought_tokens}, A={config.ahead_tokens}) keeps at least {need / GIB:.1f} GiB of "
        f"activations (a rough lower bound: its rows x hidden size {text.hidden_size} x {text.num_hidden_layers} "
        f"layers x {per_layer} values x {2 if bf16 else 4} bytes, plus the logits), but only "
        f"{free / GIB:.1f} GiB is available{share} ({source}); lower --seq-len, --micro-batch-size, "
        "--thoughts-per-position or --sampled-thought-tokens, think at fewer positions (--thought-fraction)"
        + ("" if activation_checkpointing else ", or turn on --activation-checkpointing"))
