"""The one typed configuration of the Quiet-STaR method.

Every knob of the method lives here, with the paper's values as defaults. Field names say what
they count. In particular a thought is laid out as

    <|startofthought|>  t_1 ... t_k  <|endofthought|>

and ``sampled_thought_tokens`` is k: the start and end tokens are *not* counted. The paper's
"12 ahead" run (``n_ahead=12`` in its code) samples k = 9 tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from quietstar.utils.settings import check_field_types
from quietstar.utils.errors import QuietStarInputError

QUIETSTAR_CONFIG_NAME = "quietstar_config.json"


def check_thought_settings(thought_tokens: int | None, thought_temperature: float | None) -> None:
    """The one rule for a thought's length and temperature, wherever they enter (the config,
    ``QuietStarConfig.thought_settings``, the commands' flags): the length an int >= 0 (0 = no
    thought), the temperature a finite number >= 0 (0 = greedy). None: not given."""
    k, T = thought_tokens, thought_temperature
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise QuietStarInputError(f"thought_tokens must be an int >= 0 (0 = no thought), got {k!r}")
    if T is not None and not (isinstance(T, (int, float)) and math.isfinite(T) and T >= 0):
        raise QuietStarInputError(f"thought_temperature must be a finite number >= 0 (0 = greedy), got {T!r}")


@dataclass
class QuietStarConfig:
    """Method settings. Every field is validated in ``__post_init__`` (its type, then its range;
    every float must be finite)."""

    sampled_thought_tokens: int = 9
    """k: tokens sampled between START and END (START/END not counted). Passes spent on one
    thought as model inputs = k + 2 (START, t_1..t_k, END)."""

    ahead_tokens: int = 4
    """A: true future tokens predicted after each thought (teacher-forced, non-myopic loss).
    A=1 is the myopic next-token loss."""

    thoughts_per_position: int = 2
    """n: thoughts sampled at every position; the REINFORCE baseline is their mean reward."""

    thought_temperature: float = 1.0
    """Sampling temperature of thought tokens; 0 means greedy thoughts."""

    reward_source: Literal["mixed", "thought"] = "mixed"
    """What a thought's reward measures: the log-likelihood of the A true tokens that follow
    under the "mixed" prediction (the paper; at initialisation the mixing weight is 0, so every
    thought earns the same and REINFORCE has no signal until it grows), or under the "thought"
    prediction alone, before mixing (how well the thought itself predicts what follows: a
    signal from the first step)."""

    reward_baseline: Literal["thought_mean", "base", "ema_base"] = "thought_mean"
    """REINFORCE baseline. "thought_mean": the mean reward of the n thoughts at the same position
    (the paper). "base": the log-likelihood the model gives without a thought (works with n=1).
    "ema_base": the information gain of RLP: the log-likelihood without a thought under a slowly
    updated (EMA, ``ema_decay``) copy of the LM, which training keeps and checkpoints."""

    ema_decay: float = 0.999
    """With reward_baseline="ema_base": after every optimiser step the EMA copy becomes
    ema_decay * copy + (1 - ema_decay) * LM."""

    drop_negative_rewards: bool = True
    """Clamp rewards below zero to zero, as in the paper (with n=2 only the better thought learns)."""

    policy_loss_weight: float = 1e6
    """Weight of the REINFORCE loss in the total loss."""

    policy_logprob_temperature: float = 3.0
    """Thought-token log-probabilities in the REINFORCE loss are log_softmax(logits / this)."""

    base_loss_weight: float = 0.5
    """Weight of the base model's next-token NLL (no thought) in the total loss."""

    mixed_loss_weight: float = 0.5
    """Weight of the mean over the A ahead steps of the mixed (post-thought) NLL."""

    thought_loss_weight: float = 0.0
    """Weight of the mean over the A ahead steps of the NLL of the post-thought prediction
    *before mixing* (0 = the paper). The mixed NLL trains that prediction only in proportion to
    the mixing weight, which starts at 0: this term teaches the LM to read its own thoughts from
    the first step, as ``reward_source="thought"`` teaches it to write useful ones."""

    meta_token_lr_multiplier: float = 100.0
    """Learning-rate multiplier of the START/END embeddings under Adam-family optimisers. They are
    stored divided by this factor and multiplied back when used, so any Adam optimiser moves them
    this many times faster (a gradient multiplier would do nothing under Adam)."""

    mixing_head_hidden_size: int | None = None
    """Hidden width of the mixing-head MLP; None uses the LM's hidden size (the paper)."""

    mixing_weight_bounded: bool = False
    """False: the mixing weight w is the raw MLP output (unbounded, the reference code).
    True: w = tanh(output), bounded to (-1, 1). Either way w = 0 at initialisation."""

    start_thought_token: str = "<|startofthought|>"
    end_thought_token: str = "<|endofthought|>"
    meta_token_init: str = "---"
    """START/END embeddings start as the embedding of this string's first token."""

    thought_fraction: float = 1.0
    """Share of the positions that think in a training step: 1.0 = every position (the paper).
    Below 1 each sequence thinks at round(fraction x its positions that have a target), at least
    one, chosen by ``thought_selection``; the text pass still runs over every token, each later
    pass over the chosen positions only (a step costs about 1 + fraction (F - 1) passes). REINFORCE
    and the mixed NLL count at those positions, the base NLL everywhere."""

    thought_selection: Literal["entropy", "random"] = "entropy"
    """How ``thought_fraction`` < 1 chooses: "entropy", the positions whose base prediction (the
    text pass, no thought) has the highest entropy, where the paper finds thoughts help; "random",
    a uniform share from the forward's generator (the unbiased control)."""

    loss_chunk_tokens: int = 256
    """Rows of vocabulary-sized logits computed at a time, everywhere the method needs them
    (base and mixed NLL, the REINFORCE log-probabilities, the thought sampling): each chunk's
    logits are recomputed in the backward pass, so the vocabulary costs O(chunk x V) memory at
    any length (``vocab.VocabHead``). 0: all rows at once, kept for the backward (no recompute:
    a little faster, [tokens x V] memory)."""

    allow_position_extrapolation: bool = False
    """Let a rotary-position model (Llama, Qwen, Mistral, ...) run past its
    max_position_embeddings (a long seq_len, thought or generation): it computes there but was
    never trained there, so its predictions degrade. False: such lengths are refused before any
    work. Learned absolute positions (GPT-2) have no embedding there and are always refused."""

    def __post_init__(self) -> None:
        check_field_types(self)  # types; every float finite (NaN / inf refused)

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise QuietStarInputError(f"QuietStarConfig: {message}")

        need(isinstance(self.sampled_thought_tokens, int) and self.sampled_thought_tokens >= 1,
             f"sampled_thought_tokens must be an int >= 1 (tokens between START and END), got "
             f"{self.sampled_thought_tokens!r}; a zero-length thought is the base model itself")
        need(isinstance(self.ahead_tokens, int) and self.ahead_tokens >= 1,
             f"ahead_tokens must be an int >= 1, got {self.ahead_tokens!r}")
        need(isinstance(self.thoughts_per_position, int) and self.thoughts_per_position >= 1,
             f"thoughts_per_position must be an int >= 1, got {self.thoughts_per_position!r}")
        need(isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1,
             f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        need(not (self.reward_baseline == "thought_mean" and self.thoughts_per_position == 1
                  and self.policy_loss_weight != 0),
             "reward_baseline='thought_mean' with thoughts_per_position=1 makes every reward 0; "
             "use thoughts_per_position >= 2 or reward_baseline='base' / 'ema_base'")
        try:  # the rule it follows at inference too
            check_thought_settings(None, self.thought_temperature)
        except ValueError as e:
            raise QuietStarInputError(f"QuietStarConfig: {e}") from None
        need(self.policy_logprob_temperature > 0,
             f"policy_logprob_temperature must be > 0, got {self.policy_logprob_temperature!r}")
        for name in ("policy_loss_weight", "base_loss_weight", "mixed_loss_weight", "thought_loss_weight"):
            value = getattr(self, name)
            need(value >= 0 and math.isfinite(value), f"{name} must be finite and >= 0, got {value!r}")
        need(self.meta_token_lr_multiplier > 0,
             f"meta_token_lr_multiplier must be > 0, got {self.meta_token_lr_multiplier!r}")
        need(self.mixing_head_hidden_size is None or self.mixing_head_hidden_size >= 1,
             f"mixing_head_hidden_size must be None or >= 1, got {self.mixing_head_hidden_size!r}")
        need(self.start_thought_token != self.end_thought_token and self.start_thought_token
             and self.end_thought_token, "start and end thought tokens must be distinct, non-empty strings")
        need(bool(self.meta_token_init), "meta_token_init must be a non-empty string")
        need(0 < self.thought_fraction <= 1,
             f"thought_fraction must be in (0, 1] (1 = every position thinks), got {self.thought_fraction!r}")
        need(isinstance(self.loss_chunk_tokens, int) and self.loss_chunk_tokens >= 0,
             f"loss_chunk_tokens must be an int >= 0, got {self.loss_chunk_tokens!r}")

    @property
    def passes_per_thought(self) -> int:
        """Model passes that feed a thought's tokens (START, k sampled, END)."""
        return self.sampled_thought_tokens + 2

    @property
    def passes_per_step(self) -> int:
        """F: model passes per training step = text + thought inputs + (A-1) teacher-forced."""
        return 1 + self.passes_per_thought + self.ahead_tokens - 1

    def thought_settings(self, thought_tokens: int | None = None,
                         thought_temperature: float | None = None) -> tuple[int, float]:
        """(k, temperature) of the thoughts at inference: the values given, else this config's.
        k = 0 means no thought (the base model); temperature 0 means greedy thoughts."""
        k = self.sampled_thought_tokens if thought_tokens is None else thought_tokens
        T = self.thought_temperature if thought_temperature is None else thought_temperature
        check_thought_settings(k, T)
        return k, float(T)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuietStarConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QuietStarInputError(f"QuietStarConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, directory: str | Path) -> None:
        Path(directory, QUIETSTAR_CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "QuietStarConfig":
        path = Path(directory, QUIETSTAR_CONFIG_NAME)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found: {directory} is not a saved QuietStar model "
                                    "(save one with model.save_pretrained(dir))") from None
        except json.JSONDecodeError as e:
            raise QuietStarInputError(f"{path} is corrupt ({e}); restore it or re-save the model") from None
        return cls.from_dict(data)
