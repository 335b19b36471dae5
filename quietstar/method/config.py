"""The one typed configuration of the Quiet-STaR method.

Every knob of the method lives here, with the paper's values as defaults. Field names say what
they count. In particular a thought is laid out as

    <|startofthought|>  t_1 ... t_k  <|endofthought|>

and ``sampled_thought_tokens`` is k: the start and end tokens are *not* counted. The paper's
"12 ahead" run (``n_ahead=12`` in its code) samples k = 9 tokens.

``objective`` chooses what the same rollout is trained for (``quietstar.method.objectives``
writes the two successors out). Position i predicts x_{i+1}; a thought c at i is sampled after
x_0..x_i; G = ``thoughts_per_position`` thoughts per chosen position; h = ``ahead_tokens``.

- "quietstar" (the 2024 paper): base NLL + mixed NLL + REINFORCE (``losses.quietstar_loss``).
- "rlp" (Reinforcement as a Pretraining Objective, NVIDIA): with the post-thought prediction
  p_theta (no mixing head) and an EMA copy p_EMA of the LM (``ema_decay`` = tau),

      r(c)   = sum_{s<h} log p_theta(x_{i+1+s} | x_<=i, c, x_{i+1..i+s})
               - sum_{s<h} log p_EMA(x_{i+1+s} | x_<=i+s)                    (no gradient)
      A(c_g) = G/(G-1) * (r(c_g) - mean_g' r(c_g'))                         (leave-one-out)
      L      = mean over thoughts of -(1/|c|) sum_u min(rho_u A, clip(rho_u, 1-eps_low, 1+eps_high) A)
      rho_u  = pi_theta(c_u | ...) / pi_old(c_u | ...)   at ``thought_temperature``

  gradients reach the thought tokens only (no KL); + ``next_token_loss_weight`` x base NLL.
- "rpt" (Reinforcement Pre-Training, Microsoft): r(c) = 1 if the greedy post-thought
  prediction of x_{i+1} is an exact prefix of the true continuation ending on a token boundary
  (its token's text equals the text of x_{i+1..i+j} for some 1 <= j <= h), else 0; A = r - mean
  over the group; the same clipped surrogate; positions by ``thought_selection`` ("entropy",
  the paper's).

What each objective reads: ``sampled_thought_tokens``, ``thoughts_per_position``,
``thought_temperature``, ``ahead_tokens``, ``thought_fraction`` / ``thought_count``,
``thought_selection``, ``loss_chunk_tokens`` and the meta-token settings all three; the mixing
head, ``reward_source``, ``reward_baseline``, ``drop_negative_rewards``, the three NLL weights,
``policy_loss_weight`` and ``policy_logprob_temperature`` only "quietstar"; ``clip_eps_low``,
``clip_eps_high`` and ``next_token_loss_weight`` only "rlp" and "rpt"; ``ema_decay`` "rlp" and
``reward_baseline="ema_base"``.
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
    every float must be finite). The module docstring writes out each ``objective``."""

    objective: Literal["quietstar", "rlp", "rpt"] = "quietstar"
    """What the thoughts are trained for: "quietstar" (the 2024 method: mixing head, NLLs,
    REINFORCE), "rlp" (information gain against an EMA copy, leave-one-out group advantage,
    clipped surrogate on the thought tokens) or "rpt" (reward 1 for an exact prefix prediction
    of the next token(s), group baseline, clipped surrogate). Formulas: the module docstring.
    For rlp / rpt, ``thoughts_per_position`` is the group size G (>= 2), ``ahead_tokens`` the
    next-token horizon h (1 = the RLP paper), ``thought_temperature`` the sampling policy's
    temperature (> 0) and ``thought_selection`` where they think (presets: ``rlp``, ``rpt``).
    A model trained by rlp / rpt predicts after a thought from the post-thought state itself,
    at inference too (``QuietStarForCausalLM.mix``: no mixing head)."""

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

    policy_positions: Literal["partial", "reference"] = "partial"
    """Which positions' thoughts REINFORCE learns from. "partial": every position that thought
    and has a next token (0..L-2); one among the last A sums its reward over the true tokens that
    exist. "reference": positions 0..L-2-A of the batch only, as the reference code slices them
    (every reward then sums A tokens; L-1-A, whose A tokens exist too, is left out as well); the
    policy loss and the reward metrics average over those. "partial" is the default: it keeps
    every thought that has a target in the gradient, where the reference leaves out the last A
    of them (1.6% at L = 256, A = 4; 13% at L = 32), and the recorded results used it.
    "reference" needs sequences of at least A + 2 tokens. See docs/fidelity.md."""

    policy_loss_weight: float = 1e6
    """Weight of the REINFORCE loss in the total loss."""

    policy_logprob_temperature: float = 3.0
    """Thought-token log-probabilities in the REINFORCE loss are log_softmax(logits / this)."""

    base_loss_weight: float = 0.5
    """Weight of the base model's next-token NLL (no thought) in the total loss."""

    mixed_loss_weight: float = 0.5
    """Weight of the mean over the A ahead steps of the mixed (post-thought) NLL."""

    meta_tokens_in_loss: bool = False
    """False: START/END are out of every softmax, the losses' too (their logits -inf), so the NLLs
    and rewards are those of the distribution the model predicts from: it never emits them.
    True: the NLLs and rewards use the full softmax, the meta tokens' logits included, as the
    reference code does (it masks them only to sample, and the REINFORCE log-probabilities of the
    thought tokens stay masked here too); it raises the NLLs by about 2/V at initialisation. Only
    meta tokens with a row in the LM head take part (a vocabulary padded beyond the tokenizer's;
    quietstar never resizes the base model). Sampling, scoring and generation always mask them.
    See docs/fidelity.md."""

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

    mixing_head_bias: bool = True
    """Whether the mixing head's last layer has a bias (starting at 0, not decayed). The reference
    code's has none (False). Either way w = 0 at initialisation and the loss is the same there;
    the bias is a learned constant share of the thought, and the saved models and recorded
    results have one, so it stays the default. See docs/fidelity.md."""

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

    thought_count: int | None = None
    """Thinking positions per sequence in a training step, instead of ``thought_fraction``
    (which then must stay 1): min(count, positions with a target), chosen by
    ``thought_selection``. None: ``thought_fraction`` decides. RLP / RPT think at a few positions
    per document with long thoughts; a count keeps a step's cost fixed whatever the length."""

    thought_can_end: bool = False
    """rlp / rpt: a thought may end before its k tokens: END (where the LM head has a row for it)
    and EOS become sampleable inside it, and the first one sampled ends it. The thought is then
    the tokens before it, closed by END (an EOS is replaced by END), followed by the true next
    tokens at the position ids they would have right after it; the stop token's log-probability
    counts in the surrogate (stopping is an action), the ids after it are padding, masked from
    every loss. |c| in the surrogate is the thought's own token count. Training, ``think`` /
    ``score_thoughts`` and ``generate`` alike. "quietstar" refuses it (its REINFORCE term averages
    over all k)."""

    thought_prefix: str = ""
    """Text forced at the start of every thought, after START and before the k sampled tokens
    (e.g. "<think>\n" for an instruct model, so its own reasoning habit starts the thought): a
    thought is START, the prefix's m tokens, t_1..t_k, END, so a step runs m more passes
    (F = m + k + A + 2) and positions go m further. The prefix tokens are inputs, never sampled,
    and carry no loss. "": none (the paper)."""

    clip_eps_low: float = 0.2
    """rlp / rpt: the surrogate clips the importance ratio below at 1 - clip_eps_low (PPO's 0.2;
    the papers' values are not stated in their text)."""

    clip_eps_high: float = 0.2
    """rlp / rpt: ... and above at 1 + clip_eps_high."""

    next_token_loss_weight: float = 0.0
    """rlp / rpt: weight of the LM's own next-token NLL (no thought, every position) added to the
    surrogate; 0 = the papers (no next-token term). "quietstar" has ``base_loss_weight``."""

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
        need(not (self.objective == "quietstar" and self.reward_baseline == "thought_mean"
                  and self.thoughts_per_position == 1 and self.policy_loss_weight != 0),
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
        need(self.thought_count is None or self.thought_count >= 1,
             f"thought_count must be None or an int >= 1 (positions per sequence), got {self.thought_count!r}")
        need(self.thought_count is None or self.thought_fraction == 1,
             f"give thought_count ({self.thought_count}) or thought_fraction ({self.thought_fraction}) "
             "< 1, not both: each chooses how many positions think")
        if self.objective != "quietstar":
            need(self.thoughts_per_position >= 2,
                 f"objective={self.objective!r} needs thoughts_per_position (the group size G) >= 2: "
                 f"its advantage compares a thought with the others of its group, got "
                 f"{self.thoughts_per_position}")
            need(self.thought_temperature > 0,
                 f"objective={self.objective!r} needs thought_temperature > 0: the surrogate's ratio is "
                 "of the sampling policy's probabilities, which greedy thoughts do not have")
        need(not (self.thought_can_end and self.objective == "quietstar"),
             "thought_can_end needs objective='rlp' or 'rpt': the quietstar objective's REINFORCE term "
             "averages over all k thought tokens")
        need(self.start_thought_token not in self.thought_prefix and self.end_thought_token not in self.thought_prefix,
             "thought_prefix must not contain the thought meta tokens (START comes before it, END after the thought)")
        need(0 <= self.clip_eps_low < 1, f"clip_eps_low must be in [0, 1), got {self.clip_eps_low!r}")
        need(self.clip_eps_high >= 0, f"clip_eps_high must be >= 0, got {self.clip_eps_high!r}")
        need(self.next_token_loss_weight >= 0,
             f"next_token_loss_weight must be >= 0, got {self.next_token_loss_weight!r}")
        need(isinstance(self.loss_chunk_tokens, int) and self.loss_chunk_tokens >= 0,
             f"loss_chunk_tokens must be an int >= 0, got {self.loss_chunk_tokens!r}")

    @property
    def uses_ema_copy(self) -> bool:
        """Training keeps an EMA copy of the LM: the RLP objective, or ``reward_baseline="ema_base"``."""
        return self.objective == "rlp" or (self.objective == "quietstar" and self.reward_baseline == "ema_base")

    @property
    def thought_logprob_temperature(self) -> float:
        """The temperature of the thought tokens' log-probabilities in the policy term: the
        REINFORCE temperature for "quietstar"; for rlp / rpt the sampling temperature, so the
        surrogate's ratio is of the policy that sampled."""
        return self.policy_logprob_temperature if self.objective == "quietstar" else self.thought_temperature

    def thought_prefix_ids(self, tokenizer) -> tuple[int, ...]:
        """``thought_prefix`` as the m ids ``tokenizer`` gives it (no special tokens), forced after
        START: the model's (``QuietStarForCausalLM.thought_prefix_ids``) and the count of positions
        a command checks before loading the weights both come from here."""
        return tuple(tokenizer(self.thought_prefix, add_special_tokens=False).input_ids)

    @property
    def passes_per_thought(self) -> int:
        """Model passes that feed a thought's tokens (START, k sampled, END; a ``thought_prefix``
        adds its token count)."""
        return self.sampled_thought_tokens + 2

    @property
    def passes_per_step(self) -> int:
        """F: model passes per training step = text + thought inputs + (A-1) teacher-forced."""
        return 1 + self.passes_per_thought + self.ahead_tokens - 1

    def check_training_length(self, length: int, what: str = "sequence length") -> None:
        """The one rule for the length of a training sequence, wherever it enters (TrainConfig's
        seq_len, the loss): A + 1 tokens (each thought is trained to predict A true tokens), and
        A + 2 with policy_positions="reference" (REINFORCE at positions 0..L-2-A)."""
        A = self.ahead_tokens
        if self.policy_positions == "reference" and length < A + 2:
            raise QuietStarInputError(
                f"{what} {length} must be at least ahead_tokens + 2 = {A + 2} with policy_positions="
                f"'reference', which counts REINFORCE at positions 0..L-2-A only (none at L = {length}, "
                f"A = {A}); use longer sequences or policy_positions='partial'")
        if length < A + 1:
            raise QuietStarInputError(f"{what} {length} must exceed ahead_tokens {A}: every thought is "
                                      "trained to predict that many true tokens")

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
