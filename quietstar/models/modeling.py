"""QuietStarForCausalLM: any transformers causal LM, taught to think before it speaks."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quietstar.method import attention
from quietstar.models import limits, saved_model
from quietstar.method.config import QuietStarConfig
from quietstar.method.losses import NonFiniteLossError, quietstar_loss_terms
from quietstar.method.meta_tokens import MetaTokenEmbedding, add_meta_tokens, meta_token_init_vector
from quietstar.method.mixing import MixingHead
from quietstar.method.held_gradients import HeldGradients
from quietstar.method.objectives import (join_row_parts, successor_loss_terms, thought_health, thought_logprobs,
                                         update_ema)
from quietstar.models.model_card import TrainingFacts
from quietstar.method.rollout import GridHidden, Rollout, rollout_positions, text_positions
from quietstar.method.selection import ThoughtRows, check_thought_positions, inference_chooser, thought_rows_chooser
from quietstar.method.targets import loss_head, step_logprobs, training_targets
from quietstar.method.vocab import VocabHead
from quietstar.utils.batching import check_padding_masked
from quietstar.utils.modes import eval_mode
from quietstar.utils.errors import QuietStarInputError


@dataclass
class ThoughtScores:
    """What ``score_thoughts`` returns for fixed thoughts."""

    base_logits: torch.Tensor     # [B, L, V]     no thought: predicts x_{i+1}
    thought_logits: torch.Tensor  # [B, L, A, V]  after the thought and s true tokens: x_{i+1+s}
    mixing_weight: torch.Tensor   # [B, L, A]
    mixed_logits: torch.Tensor    # [B, L, A, V]
    thought_positions: torch.Tensor | None = None  # [B, L] bool: where a thought was scored; None: all


@dataclass
class QuietStarOutput:
    """What a training-mode forward returns."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]  # detached scalars: the objective's loss terms' (and mean_mixing_weight)
    thought_ids: torch.Tensor         # [B, n, L, k] the sampled thoughts (inner tokens; pad id
                                      # where no thought)
    terms: dict[str, torch.Tensor]    # "nll", "policy": the weighted terms of loss, with gradients
    thought_positions: torch.Tensor | None = None  # [B, L] bool: the positions that thought; None: all


class QuietStarForCausalLM(nn.Module):
    """A causal LM with a learned thought after every token and a mixing head.

    Build one with ``from_base`` (fresh) or ``from_pretrained`` (saved). ``lm`` is the unmodified
    transformers model (its attention is routed to quietstar's function, nothing else changes).
    """

    def __init__(self, lm, tokenizer, config: QuietStarConfig, embedding: MetaTokenEmbedding,
                 mixing_head: MixingHead):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.config = config
        self.embedding = embedding
        self.mixing_head = mixing_head
        self.start_id, self.end_id = embedding.start_id, embedding.end_id
        vocab = lm.get_output_embeddings().weight.shape[0]
        meta_in_vocab = [i for i in (self.start_id, self.end_id) if i < vocab]
        self.register_buffer("_meta_logit_ids", torch.tensor(meta_in_vocab, dtype=torch.long),
                             persistent=False)
        self.ema_lm = None  # config.uses_ema_copy: a frozen, slowly updated copy of lm
        # config.thought_prefix as the ids forced after START (the config checked its text)
        self.thought_prefix_ids = config.thought_prefix_ids(tokenizer)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(cls, model, tokenizer, config: QuietStarConfig | None = None, *,
                  saved_tokenizer: bool = False) -> "QuietStarForCausalLM":
        """Wraps a transformers causal LM: adds the meta tokens, initialises them from
        ``config.meta_token_init`` and attaches a mixing head that starts at w = 0.

        The thought token strings must be new to ``tokenizer``; ``saved_tokenizer=True`` (a
        tokenizer of a saved QuietStar folder) accepts the meta tokens it already holds."""
        config = QuietStarConfig() if config is None else config
        _check_model(model)
        _check_tokenizer_and_config(tokenizer, config)
        _check_vocabulary(model, tokenizer, config)  # before the tokenizer gets the meta tokens
        start_id, end_id = add_meta_tokens(tokenizer, config.start_thought_token, config.end_thought_token,
                                           saved=saved_tokenizer)
        base_embed = model.get_input_embeddings()
        init = meta_token_init_vector(tokenizer, base_embed, config.meta_token_init)
        embedding = MetaTokenEmbedding(base_embed, start_id, end_id, init, config.meta_token_lr_multiplier)
        head = MixingHead(model.config.get_text_config().hidden_size, config.mixing_head_hidden_size,
                          config.mixing_weight_bounded, bias=config.mixing_head_bias)
        attention.install(model)
        return cls(model, tokenizer, config, embedding, head.to(base_embed.weight.device))

    # ------------------------------------------------------------------ saving and loading
    # The saved folder and its head file are saved_model.py's; the model keeps only the three
    # methods transformers users expect, which delegate to it.
    def save_pretrained(self, directory: str | Path, training: TrainingFacts | None = None) -> None:
        """Writes the base LM (safetensors), tokenizer, QuietStar config, learned head and the
        model card (with ``training``'s facts if given)."""
        saved_model.save_pretrained(self, directory, training)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload Quiet-STaR model", folder: str | Path | None = None) -> str:
        """Uploads the model to the Hugging Face Hub repo ``repo_id`` (created if missing): a saved
        ``folder`` as it is (e.g. a training checkpoint's model, with its card), else this model
        saved afresh. Returns the repo's URL."""
        return saved_model.push_to_hub(self, repo_id, private=private, token=token,
                                       commit_message=commit_message, folder=folder)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, revision: str | None = None,
                        cache_dir: str | Path | None = None, local_files_only: bool | None = None,
                        token: str | bool | None = None, **model_kwargs) -> "QuietStarForCausalLM":
        """Loads what ``save_pretrained`` (or ``push_to_hub``) wrote: a local folder, or a Hub repo
        id (``revision``, ``cache_dir``, ``token``; offline — ``local_files_only``, or
        HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1 — a repo already in the local cache loads
        without the network). The
        learned meta tokens and head come back intact. ``model_kwargs`` go to transformers'
        ``from_pretrained`` of the LM (``dtype`` — or the older name ``torch_dtype`` —,
        ``device_map``, ...)."""
        return saved_model.load_pretrained(cls, name_or_path, revision=revision, cache_dir=cache_dir,
                                           local_files_only=local_files_only, token=token, **model_kwargs)

    # ------------------------------------------------------------------ pieces
    def get_input_embeddings(self) -> MetaTokenEmbedding:
        return self.embedding

    @property
    def decoder(self):
        return self.lm.get_decoder()

    @property
    def rollout(self) -> Rollout:
        """The rollout of the current decoder, embedding and head: built on access, as FSDP or peft may wrap them."""
        stops = ()
        if self.config.thought_can_end:  # END where the head has a row for it (masked there), and EOS
            end = self.end_id if self.end_id in self._meta_logit_ids.tolist() else None
            stops = tuple(i for i in (end, self.tokenizer.eos_token_id) if i is not None)
        return Rollout(self.decoder, self.embedding, self.vocab_head(), self.start_id, self.end_id,
                       self.config.ahead_tokens, self.tokenizer.pad_token_id, self.thought_prefix_ids, stops)

    def vocab_head(self, lm=None) -> VocabHead:
        """The LM head of ``lm`` (default the model's own LM) as the loss and the sampler use it:
        the meta tokens are never predicted; ``config.loss_chunk_tokens`` rows at a time."""
        lm = self.lm if lm is None else lm
        out = lm.get_output_embeddings()
        cap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
        partitioned = hasattr(out.weight, "ds_id")  # DeepSpeed ZeRO-3: gathered only inside out()
        return VocabHead(out.weight, getattr(out, "bias", None), cap, self._meta_logit_ids,
                         self.config.loss_chunk_tokens, out if partitioned else None)

    def logits(self, hidden: torch.Tensor, lm=None) -> torch.Tensor:
        """LM logits [..., V] of final hidden states (of ``lm``, default the model's own LM); the
        meta tokens are never predicted."""
        return self.vocab_head(lm).logits(hidden)

    def check_positions(self, positions: int, what: str, allow_extrapolation: bool | None = None) -> None:
        """Refuses ``what``, which needs position ids 0..positions-1, past the LM's
        ``max_position_embeddings`` (``limits.check_positions``: a rotary LM may go past them with
        ``allow_extrapolation``, default ``config.allow_position_extrapolation``), before any work."""
        allow = self.config.allow_position_extrapolation if allow_extrapolation is None else allow_extrapolation
        limits.check_positions(self.lm.config, positions, what, allow, type(self.lm).__name__)

    def check_rollout_positions(self, length: int, what: str, thought_tokens: int | None = None) -> None:
        """``check_positions`` for a rollout over ``length`` text tokens with a
        ``thought_tokens``-token thought (default the config's k) and A ahead tokens."""
        k = self.config.sampled_thought_tokens if thought_tokens is None else thought_tokens
        self.check_positions(rollout_positions(length, len(self.thought_prefix_ids) + k, self.config.ahead_tokens), what)

    def _check_text(self, input_ids, attention_mask):
        """Validates token ids [B, L >= 1] and their mask; returns the mask (ones if None)."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise QuietStarInputError(f"input_ids must be [batch, length] with length >= 1, got shape "
                                      f"{tuple(input_ids.shape)}")
        tok = self.tokenizer
        check_padding_masked(input_ids, attention_mask, tok.pad_token_id, (tok.eos_token_id, tok.bos_token_id))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise QuietStarInputError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                                      f"{tuple(input_ids.shape)}; they must match")
        meta = (input_ids == self.start_id) | (input_ids == self.end_id)
        if meta.any():
            raise QuietStarInputError("input_ids contain the thought meta tokens; the text must not: "
                                      "thoughts are inserted by the model")
        return attention_mask

    def mix(self, base_hidden: torch.Tensor, thought_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the model predicts with a thought, (hidden [..., d], weight [...]), from base and
        post-thought states [..., d] of the same token: the mixing head's for "quietstar", the
        post-thought state (w = 1) for "rlp" / "rpt" (no mixing head). Every prediction with a
        thought (score_thoughts, think, generate, the evaluations) comes from here."""
        if self.config.objective == "quietstar":
            return self.mixing_head(base_hidden, thought_hidden)
        return thought_hidden, thought_hidden.new_ones(thought_hidden.shape[:-1])

    def _mix(self, grid: GridHidden) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed hidden states [B, W, A, d] and weights [B, W, A] of the W thought rows; step s
        pairs the post-thought state of position i with the base state of position i+s (both
        predict x_{i+1+s})."""
        B, W, A = grid.after.shape[:3]
        L = grid.base.shape[1]
        ahead = torch.arange(A, device=grid.base.device)
        if grid.rows is None:
            idx = (torch.arange(L, device=grid.base.device)[:, None] + ahead[None, :]).clamp(max=L - 1)
            base = grid.base[:, idx]  # [B, L, A, d]
        else:
            idx = (grid.rows.index[:, :, None] + ahead).clamp(max=L - 1)  # [B, S, A]
            base = grid.base[torch.arange(B, device=idx.device)[:, None, None], idx]  # [B, S, A, d]
        return self.mix(base, grid.after)

    # ------------------------------------------------------------------ public computations
    def base_logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        """The base model's next-token logits [B, L, V], no thought (position i predicts x_{i+1});
        any length >= 1, left or right padding."""
        attention_mask = self._check_text(input_ids, attention_mask)
        hidden = self.decoder(inputs_embeds=self.embedding(input_ids), attention_mask=attention_mask,
                              position_ids=text_positions(attention_mask)).last_hidden_state
        return self.logits(hidden)

    def score_thoughts(self, input_ids, thought_ids, attention_mask=None, thought_positions=None,
                       steps: int | None = None) -> ThoughtScores:
        """Logits with fixed thoughts ``thought_ids`` [B, L, k] (inner tokens, END only where it ends one),
        for any length >= 1: steps past the end of the text are computed on padding (ignore them).

        ``thought_positions`` [B, L] bool thinks only there (the thoughts elsewhere are not read),
        at the cost of the text pass plus the chosen rows' passes; every other position predicts
        with the base: its thought and mixed logits of x_{i+1+s} are the base logits of position
        i+s, its mixing weight 0. ``steps`` (1..A, default A) returns the first ``steps`` ahead
        predictions only ([B, L, steps, ...]): the next token's alone is ``steps=1``, which skips
        most of the vocabulary-sized logits."""
        attention_mask = self._check_text(input_ids, attention_mask)
        check_thought_positions(thought_positions, input_ids)
        steps = self._check_steps(steps)
        if thought_ids.dim() != 3 or thought_ids.shape[:2] != input_ids.shape:
            raise QuietStarInputError(f"thought_ids must be [batch, length, k] matching input_ids "
                                      f"{tuple(input_ids.shape)}, got {tuple(thought_ids.shape)}")
        if ((thought_ids == self.start_id) | (thought_ids == self.end_id) & (self.end_id not in self.rollout.stop_ids)).any():
            raise QuietStarInputError("thought_ids contain START/END; pass only the inner thought tokens")
        L = input_ids.shape[1]
        self.check_rollout_positions(L, f"scoring thoughts on {L} tokens", thought_ids.shape[-1])
        rows = None
        if thought_positions is not None:
            rows = ThoughtRows.from_mask(thought_positions & attention_mask.bool())
            thought_ids = rows.gather(thought_ids)
        return self._thought_scores(self.rollout.score(input_ids, thought_ids, attention_mask, rows), steps)

    @torch.no_grad()
    def think(self, input_ids, attention_mask=None, num_tokens=None, temperature=None, generator=None,
              thought_positions=None, steps: int | None = None, *, thought_fraction: float | None = None,
              thought_selection: str | None = None) -> tuple[torch.Tensor, ThoughtScores]:
        """``sample_thoughts`` and ``score_thoughts`` of those thoughts in one rollout, without
        gradients or dropout: the text pass runs once (``thought_fraction`` chooses on it) and the
        scoring passes continue the sampling passes. Returns (thoughts [B, L, k], ThoughtScores),
        equal to the two calls' with the same generator; the arguments are theirs (k = ``num_tokens`` >= 1)."""
        steps = self._check_steps(steps)
        thoughts, grid = self._think(input_ids, attention_mask, num_tokens, temperature, generator,
                                     thought_positions, thought_fraction, thought_selection)
        if grid.rows is not None:
            thoughts = grid.rows.scatter(thoughts, input_ids.shape[1], self.tokenizer.pad_token_id)
        return thoughts, self._thought_scores(grid, steps)

    @torch.no_grad()
    def next_token_hidden(self, input_ids, attention_mask=None, generator=None, *,
                          thought_fraction: float | None = None, thought_selection: str | None = None,
                          thought_positions=None) -> torch.Tensor:
        """[B, L, d]: the hidden state of what the model predicts for x_{i+1} with its thoughts
        (the config's k and temperature, sampled from ``generator``): the mixed state where
        position i thought, the base state elsewhere (``thought_fraction`` / ``thought_selection`` /
        ``thought_positions`` as in ``think``). ``vocab_head()`` of it gives the mixed next-token
        logits of ``think`` a chunk at a time, with no [B, L, V] tensor (distillation's teacher)."""
        _, grid = self._think(input_ids, attention_mask, None, None, generator, thought_positions,
                              thought_fraction, thought_selection)
        mixed, _ = self._mix(grid)                                   # [B, W, A, d]
        if grid.rows is None:
            return mixed[:, :, 0]
        return grid.rows.put(mixed[:, :, 0], grid.base)

    def _think(self, input_ids, attention_mask, num_tokens, temperature, generator, thought_positions,
               thought_fraction, thought_selection) -> tuple[torch.Tensor, GridHidden]:
        """Samples and scores thoughts in one rollout without dropout: (thoughts [B, W, k], its GridHidden)."""
        attention_mask = self._check_text(input_ids, attention_mask)
        check_thought_positions(thought_positions, input_ids)
        k, temperature = self.config.thought_settings(num_tokens, temperature)
        if k < 1:
            raise QuietStarInputError(f"think needs a thought of num_tokens >= 1, got {k}; k = 0 is base_logits")
        L = input_ids.shape[1]
        self.check_rollout_positions(L, f"thinking on {L} tokens", k)
        select = self._select(attention_mask, thought_positions, thought_fraction, thought_selection, generator)
        with eval_mode(self.lm):
            thoughts, grid, _ = self.rollout.sample_and_score(
                input_ids, attention_mask, num_tokens=k, temperature=temperature, generator=generator,
                logprob_temperature=None, select=select)
        return thoughts, grid

    def _check_steps(self, steps: int | None) -> int:
        A = self.config.ahead_tokens
        if steps is None:
            return A
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= A:
            raise QuietStarInputError(f"steps must be an int in 1..ahead_tokens = 1..{A} (the ahead predictions "
                                      f"returned), got {steps!r}")
        return steps

    def _thought_scores(self, grid: GridHidden, steps: int) -> ThoughtScores:
        """The ThoughtScores of a scored rollout, its first ``steps`` ahead predictions, at every
        position (the base's where the rollout's rows did not think)."""
        mixed, w = self._mix(grid)
        base_logits = self.logits(grid.base)
        thought_logits, mixed_logits = self.logits(grid.after[:, :, :steps]), self.logits(mixed[:, :, :steps])
        w = w[:, :, :steps]
        if grid.rows is None:
            return ThoughtScores(base_logits, thought_logits, w, mixed_logits)
        L = base_logits.shape[1]
        idx = (torch.arange(L, device=w.device)[:, None]
               + torch.arange(steps, device=w.device)[None, :]).clamp(max=L - 1)
        ahead = base_logits[:, idx]  # [B, L, steps, V]: the base's prediction of x_{i+1+s}
        rows = grid.rows
        return ThoughtScores(base_logits, rows.put(thought_logits, ahead), rows.scatter(w, L),
                             rows.put(mixed_logits, ahead), rows.mask(L))

    def sample_thoughts(self, input_ids, attention_mask=None, num_tokens=None, temperature=None,
                        generator=None, thought_positions=None, *, thought_fraction: float | None = None,
                        thought_selection: str | None = None) -> torch.Tensor:
        """Samples one thought after every position, or only at ``thought_positions`` [B, L] bool
        (the pad id elsewhere): [B, L, k] inner token ids (k = ``num_tokens``, default the
        config's; ``temperature`` likewise, 0 = greedy). Or at a ``thought_fraction`` in (0, 1] of
        each row's positions with a next token, chosen as in training by ``thought_selection``
        (default the config's): "entropy" of the rollout's own text pass, or "random" from
        ``generator``; None (default): every position, whatever the config's fraction. Given
        ``thought_positions`` win."""
        attention_mask = self._check_text(input_ids, attention_mask)
        check_thought_positions(thought_positions, input_ids)
        select = self._select(attention_mask, thought_positions, thought_fraction, thought_selection, generator)
        thoughts, rows = self._sample(input_ids, attention_mask, num_tokens, temperature, generator, select)
        return thoughts if rows is None else rows.scatter(thoughts, input_ids.shape[1], self.tokenizer.pad_token_id)

    @torch.no_grad()
    def choose_thought_positions(self, input_ids, attention_mask=None, thought_fraction: float = 1.0,
                                 thought_selection: str | None = None, generator=None) -> torch.Tensor:
        """[B, L] bool: where ``sample_thoughts`` / ``think`` at ``thought_fraction`` would think (the
        same text pass and draws from ``generator``; fraction 1: every real position), from the text
        pass alone: for thoughts made elsewhere (controls), as ``score_thoughts``' thought_positions."""
        attention_mask = self._check_text(input_ids, attention_mask)
        select = self._select(attention_mask, None, thought_fraction, thought_selection, generator)
        if select is None:
            return attention_mask.bool()
        return self._sample(input_ids, attention_mask, 0, 0.0, select=select)[1].mask(input_ids.shape[1])

    def _select(self, attention_mask, thought_positions, thought_fraction, thought_selection, generator):
        """``selection.inference_chooser`` with this model's entropy and, unless given, selection."""
        how = self.config.thought_selection if thought_selection is None else thought_selection
        return inference_chooser(self.vocab_head().entropy, attention_mask, thought_positions, thought_fraction,
                                 how, generator)

    def _sample(self, input_ids, attention_mask, num_tokens=None, temperature=None, generator=None,
                select=None) -> tuple[torch.Tensor, ThoughtRows | None]:
        """``Rollout.sample`` without dropout (k, temperature: the config's unless given)."""
        k, temperature = self.config.thought_settings(num_tokens, temperature)
        self.check_positions(input_ids.shape[1] + len(self.thought_prefix_ids) + k,
                             f"sampling thoughts on {input_ids.shape[1]} tokens")
        with eval_mode(self.lm):  # sampled without dropout, as the model predicts at inference
            return self.rollout.sample(input_ids, attention_mask, num_tokens=k, temperature=temperature,
                                       generator=generator, select=select)

    def forward(self, input_ids, attention_mask=None, labels=None, generator=None,
                check_finite: bool = True, thought_ids=None, thought_positions=None,
                thought_tokens_per_backward: int = 0) -> QuietStarOutput:
        """One training step's loss: sample n thoughts per position, score them, and train them by
        ``config.objective`` (quietstar: mix, NLLs, REINFORCE; rlp / rpt: ``method.objectives``).

        ``thought_ids`` [B, n, L, k] replaces sampling with given thoughts (inner tokens), e.g. to
        replay the ``thought_ids`` of an earlier output. ``thought_positions`` [B, L] bool thinks
        only there (and only where a target exists), instead of ``config.thought_fraction``'s
        choice; replaying thoughts under a fraction < 1 needs the earlier output's
        ``thought_positions``. ``check_finite`` raises ``NonFiniteLossError`` on a NaN/inf loss
        (one host sync).

        ``thought_tokens_per_backward`` > 0 (rlp / rpt, with gradients, without activation
        checkpointing; ``TrainConfig.thought_tokens_per_backward``): the same loss and gradients
        at less memory and time: the thoughts are sampled without gradients, the text pass runs
        once per text (not once per thought), and the thoughts are scored and differentiated a
        group of positions at a time, each group's thought passes about this many tokens (at
        least one position), each group's graph freed before the next; the loss's backward
        then finishes the text pass's (``_successor_in_groups``). 0: every thought in one graph,
        sampled and scored in the same passes.
        """
        cfg = self.config
        n = cfg.thoughts_per_position
        attention_mask = self._check_text(input_ids, attention_mask)
        check_thought_positions(thought_positions, input_ids)
        targets, valid = training_targets(input_ids, attention_mask, labels, cfg.ahead_tokens)
        L = input_ids.shape[1]
        self.check_rollout_positions(L, f"a training step on {L} tokens",
                                     None if thought_ids is None else thought_ids.shape[-1])
        ema_base_logp = None
        if cfg.uses_ema_copy:
            ema_base_logp = self._ema_base_logp(input_ids, attention_mask, targets[..., 0]).repeat_interleave(n, 0)
        if thought_ids is not None and thought_positions is None and (cfg.thought_fraction < 1 or cfg.thought_count):
            raise QuietStarInputError("replaying thought_ids with thought_fraction < 1 or a thought_count needs the "
                                      "positions they were sampled at: pass the earlier output's thought_positions too")
        if thought_tokens_per_backward < 0:
            raise QuietStarInputError(f"thought_tokens_per_backward must be >= 0 (0: one backward for every "
                                      f"thought), got {thought_tokens_per_backward}")
        rollout = self.rollout
        head = rollout.head  # every vocabulary-sized product, chunked (see vocab.py)
        select = thought_rows_chooser(head.entropy, valid[..., 0], thought_positions, n, cfg.thought_fraction,
                                      cfg.thought_selection, generator, count=cfg.thought_count)
        if (thought_tokens_per_backward and cfg.objective != "quietstar" and torch.is_grad_enabled()
                and not getattr(self.lm, "is_activation_checkpointing", False)):
            thoughts, rows, nll_term, policy_term, metrics = self._successor_in_groups(
                rollout, input_ids, attention_mask, targets, valid, ema_base_logp, select, generator, thought_ids,
                thought_tokens_per_backward)
            return self._output(nll_term, policy_term, metrics, thoughts, rows, L, check_finite)
        # The n thoughts of a text are adjacent rows: [B*n, ...].
        input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
        targets, valid = targets.repeat_interleave(n, 0), valid.repeat_interleave(n, 0)

        # 1. sample and score the thoughts (at the W rows that think: every position, or S chosen).
        thoughts, grid, thought_logp = self._training_rollout(rollout, input_ids, attention_mask, generator,
                                                              thought_ids, select)
        # 2. the objective from the scored rollout: NLL and policy terms; detached metrics beside them.
        if cfg.objective == "quietstar":
            nll_term, policy_term, metrics = self._quietstar_terms(head, grid, thoughts, thought_logp, targets,
                                                                   valid, ema_base_logp)
        else:  # rlp / rpt: the LM reads its own thought, no mixing head (objectives.py)
            logp = thought_logprobs(cfg, head, grid, thoughts, thought_logp, targets, valid,
                                    thought_head=rollout.thought_head)
            nll_term, policy_term, metrics = successor_loss_terms(
                cfg, logp, ema_base_logp=ema_base_logp, token_strings=self.tokenizer.convert_ids_to_tokens)
        return self._output(nll_term, policy_term, metrics, thoughts, grid.rows, L, check_finite)

    def _output(self, nll_term, policy_term, metrics, thoughts, rows: ThoughtRows | None, L: int,
                check_finite: bool) -> QuietStarOutput:
        """The QuietStarOutput of a step's terms and its thoughts [B*n, W, k] at ``rows``
        (None: all L), after ``forward``'s finiteness check."""
        n = self.config.thoughts_per_position
        loss = nll_term + policy_term
        if check_finite and not torch.isfinite(loss):
            bad = [name for name in ("base_nll", "mixed_nll", "thought_nll", "policy_loss")
                   if name in metrics and not torch.isfinite(metrics[name])]
            raise NonFiniteLossError(
                f"the QuietStar loss is {loss.item()} (non-finite parts: {bad or 'the weighted sum'}); "
                "lower the learning rate or policy_loss_weight, check the data for empty sequences, or "
                "train in float32 / bfloat16 instead of float16")
        positions = None
        if rows is not None:
            thoughts = rows.scatter(thoughts, L, self.tokenizer.pad_token_id)
            positions = rows.mask(L)[::n]
        return QuietStarOutput(loss, metrics, thoughts.view(-1, n, *thoughts.shape[1:]),
                               {"nll": nll_term, "policy": policy_term}, positions)

    def _quietstar_terms(self, head, grid, thoughts, thought_logp, targets, valid, ema_base_logp):
        """The "quietstar" objective of a scored rollout: mix, the log-likelihoods (targets.py),
        the loss terms (losses.py); the metrics gain ``mean_mixing_weight`` and the thoughts'
        ``leak_rate`` and ``distinct_thoughts`` (``objectives.thought_health``: a thought that
        writes the next token earns the likelihood reward without reasoning)."""
        mixed, w = self._mix(grid)
        logp = step_logprobs(self.config, head, grid, mixed, thoughts, thought_logp, targets, valid)
        nll_term, policy_term, metrics = quietstar_loss_terms(self.config, logp, ema_base_logp)
        mask = logp.row_valid.to(w.dtype)
        metrics["mean_mixing_weight"] = (w.detach() * mask).sum() / mask.sum().clamp(min=1)
        next_tokens = (targets if grid.rows is None else grid.rows.gather(targets))[..., 0]  # [B*n, W]
        own = torch.ones_like(thoughts, dtype=torch.bool)  # quietstar thoughts never end early
        health = thought_health(thoughts, own, next_tokens, logp.row_valid[..., 0], self.config.thoughts_per_position)
        metrics |= {name: health[name] for name in ("leak_rate", "distinct_thoughts")}
        return nll_term, policy_term, metrics

    def _training_rollout(self, rollout: Rollout, input_ids, attention_mask, generator, thought_ids, select):
        """Step 1 of ``forward`` on its [B*n] rows: (thoughts [B*n, W, k], GridHidden, the thought
        tokens' log-probabilities at the REINFORCE temperature [B*n, W, k] where they were sampled
        in the scored passes, else None). Sampled and scored in the same passes where each pass runs once,
        else (given thoughts; activation checkpointing, which recomputes one forward) sampled
        without gradients and scored as the whole grid in one forward."""
        cfg = self.config
        Bn, L = input_ids.shape
        n = cfg.thoughts_per_position
        if thought_ids is not None:
            thoughts, rows = self._given_thoughts(thought_ids, select, Bn, L)
            return thoughts, rollout.score(input_ids, thoughts, attention_mask, rows), None
        if getattr(self.lm, "is_activation_checkpointing", False):
            thoughts, rows = self._sample(input_ids, attention_mask, generator=generator, select=select)
            return thoughts, rollout.score(input_ids, thoughts, attention_mask, rows), None
        return rollout.sample_and_score(input_ids, attention_mask, num_tokens=cfg.sampled_thought_tokens,
                                        temperature=cfg.thought_temperature, generator=generator,
                                        logprob_temperature=cfg.thought_logprob_temperature, select=select)

    def _given_thoughts(self, thought_ids, select, Bn: int, L: int) -> tuple[torch.Tensor, ThoughtRows | None]:
        """Given ``thought_ids`` [B, n, L, k] as (thoughts [B*n, W, k], their ThoughtRows or None
        for all L)."""
        n = self.config.thoughts_per_position
        if thought_ids.dim() != 4 or thought_ids.shape[:3] != (Bn // n, n, L):
            raise QuietStarInputError(f"thought_ids must be [batch, thoughts_per_position, length, k] = "
                                      f"[{Bn // n}, {n}, {L}, k], got {tuple(thought_ids.shape)}")
        thoughts, rows = thought_ids.reshape(Bn, L, -1), None
        if select is not None:  # given thought_positions (forward checked): no text pass needed
            rows = select(None)
            thoughts = rows.gather(thoughts)
        return thoughts, rows

    def _successor_in_groups(self, rollout: Rollout, input_ids, attention_mask, targets, valid, ema_base_logp,
                             select, generator, thought_ids, tokens_per_backward: int):
        """rlp / rpt as ``forward`` with ``thought_tokens_per_backward``, on the B texts (not yet
        repeated): (thoughts [B*n, W, k], their ThoughtRows or None for all L, NLL term, policy
        term, metrics), the terms' gradients those of one backward through all of it.

            text       pass 0 once per text, with gradients; its keys/values detached into leaves
            sample     all thoughts at once over the text's keys, no gradient (the same draws as
                       the one-graph path)
            per group  passes 1..F-1 of a few positions' n thoughts over those leaves, their
                       part of the surrogate, its gradients (parameters, leaves) held, graph freed
            loss       the metrics and terms from all groups' detached numbers; the policy term's
                       backward hands on the held gradients, the leaves' to the text pass
        """
        cfg, n, head = self.config, self.config.thoughts_per_position, rollout.head
        B, L = input_ids.shape
        ids, mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
        targets, valid_n = targets.repeat_interleave(n, 0), valid.repeat_interleave(n, 0)
        text = rollout.text_pass(input_ids, attention_mask)                    # [B, L, d], not B*n
        if thought_ids is None:
            thoughts, rows = rollout.sample_after_text(text, ids, mask, num_tokens=cfg.sampled_thought_tokens,
                                                       temperature=cfg.thought_temperature, generator=generator,
                                                       select=select)
        else:
            thoughts, rows = self._given_thoughts(thought_ids, select, B * n, L)
        every = rows is None  # every position thinks: all L as rows
        if every:
            rows = ThoughtRows.from_mask(torch.ones_like(ids, dtype=torch.bool))
        with torch.set_grad_enabled(cfg.next_token_loss_weight > 0):
            base = head.logprobs(text.hidden, targets[::n, :, 0]).repeat_interleave(n, 0)  # [B*n, L]
        leaf_text, leaves = text.detached()
        params = [p for p in self.parameters() if p.requires_grad]
        held = HeldGradients(params + leaves)
        counted = (rows.gather(valid_n)[..., 0] & rows.valid).sum().clamp(min=1)  # the mean's thoughts
        S = rows.index.shape[1]
        passes = len(self.thought_prefix_ids) + thoughts.shape[-1] + cfg.ahead_tokens + 1  # F - 1
        size = max(1, tokens_per_backward // (B * n * passes))                 # positions per group
        parts = []
        for start in range(0, S, size):
            cols = slice(start, start + size)
            part = ThoughtRows(rows.index[:, cols], rows.valid[:, cols])
            grid = rollout.score_rows(leaf_text, ids, thoughts[:, cols], mask, part)
            logp = thought_logprobs(cfg, head, grid, thoughts[:, cols], None, targets, valid_n,
                                    thought_head=rollout.thought_head, base=base.detach())
            policy = successor_loss_terms(cfg, logp, ema_base_logp=ema_base_logp,
                                          token_strings=self.tokenizer.convert_ids_to_tokens)[1]
            held.add(policy * logp.row_valid[..., 0].sum() / counted)          # its share of the mean
            parts.append(logp)
        logp = join_row_parts(parts, base, rows)
        nll_term, policy, metrics = successor_loss_terms(cfg, logp, ema_base_logp=ema_base_logp,
                                                         token_strings=self.tokenizer.convert_ids_to_tokens)
        policy_term = held.attach(policy, params + text.tensors())
        return thoughts, None if every else rows, nll_term, policy_term, metrics

    # ------------------------------------------------------------------ the EMA baseline (RLP)
    def ema_baseline_enable(self) -> None:
        """Makes the EMA copy of the LM that RLP and ``reward_baseline="ema_base"`` measure thoughts
        against (``config.uses_ema_copy``): a frozen deep copy, moved by ``update_ema_baseline`` after every optimiser step
        (``quietstar train`` does both; a training forward makes the copy if it is missing)."""
        if self.ema_lm is None:
            ema = copy.deepcopy(self.lm).requires_grad_(False).eval()
            self.ema_lm = ema

    @torch.no_grad()
    def update_ema_baseline(self) -> None:
        """ema = ema_decay * ema + (1 - ema_decay) * lm, parameter by parameter."""
        update_ema(self.ema_lm, self.lm, self.config.ema_decay)

    @torch.no_grad()
    def _ema_base_logp(self, input_ids, attention_mask, next_tokens) -> torch.Tensor:
        """log p_EMA(x_{i+1} | x_0..x_i) [B, L] without a thought, from the EMA copy."""
        self.ema_baseline_enable()
        ema = self.ema_lm.eval()  # train() on the wrapper reaches the copy too: no dropout here
        hidden = ema.get_decoder()(inputs_embeds=ema.get_input_embeddings()(input_ids),
                                   attention_mask=attention_mask,
                                   position_ids=text_positions(attention_mask)).last_hidden_state
        return loss_head(self.config, self.vocab_head(ema)).logprobs(hidden, next_tokens)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Thinking generation (see ``quietstar.method.generation.generate`` for the arguments)."""
        from quietstar.method.generation import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute the decoder layers in the backward pass: the LM's own method and arguments (as
        Trainer passes them), non-reentrant unless the kwargs say otherwise (grid-safe)."""
        kwargs = {"use_reentrant": False} | dict(activation_checkpointing_kwargs or {})
        self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers,
                                                offload=offload)


def _check_model(model) -> None:
    if isinstance(model, QuietStarForCausalLM):
        raise QuietStarInputError("the model is a QuietStarForCausalLM already: use it as it is, or wrap its base LM "
                                  "anew with QuietStarForCausalLM.from_base(model.lm, model.tokenizer, config)")
    if not isinstance(model, nn.Module) or not hasattr(model, "config") or not hasattr(model, "get_input_embeddings"):
        raise QuietStarInputError(f"from_base wraps a loaded transformers causal LM, got {type(model).__name__}; "
                                  "load one first (AutoModelForCausalLM.from_pretrained(name)), or load a saved "
                                  "QuietStar model with QuietStarForCausalLM.from_pretrained(folder)")
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError(f"{type(model).__name__} is an encoder-decoder model; quietstar "
                                  "wraps decoder-only causal LMs")
    if model.get_output_embeddings() is None or not hasattr(model, "get_decoder"):
        raise NotImplementedError(f"{type(model).__name__} is not a causal LM with an output head; "
                                  "load it with AutoModelForCausalLM")



def _check_tokenizer_and_config(tokenizer, config) -> None:
    if not all(hasattr(tokenizer, name) for name in ("get_vocab", "convert_tokens_to_ids", "__len__")):
        raise QuietStarInputError(f"from_base needs the LM's tokenizer (AutoTokenizer.from_pretrained(name)), got "
                                  f"{type(tokenizer).__name__}")
    if not isinstance(config, QuietStarConfig):
        raise QuietStarInputError(f"config must be a QuietStarConfig, got {type(config).__name__}; e.g. "
                                  "QuietStarConfig(**settings) or QuietStarConfig.from_dict(settings)")


def _check_vocabulary(model, tokenizer, config: QuietStarConfig) -> None:
    """Every id the tokenizer can give has a row in the LM's input and output embeddings (but
    the meta tokens, which live apart): else the first such token fails deep inside torch."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = min(getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0],
               getattr(head, "out_features", None) or head.weight.shape[0])
    vocab = tokenizer.get_vocab()
    meta = {vocab.get(config.start_thought_token), vocab.get(config.end_thought_token)}
    beyond = [i for i in range(rows, len(tokenizer)) if i not in meta]
    if beyond:
        raise QuietStarInputError(
            f"the tokenizer has {rows + len(beyond)} tokens but {type(model).__name__}'s embeddings have {rows} "
            f"rows, so token ids {beyond[0]}..{beyond[-1]} have none; resize the model to its tokenizer first, "
            "model.resize_token_embeddings(len(tokenizer)), or use the tokenizer it was trained with")
