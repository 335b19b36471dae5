"""The parallel thought rollout: a thought after every token (or a chosen share), all at once.

Pass layout (position i, pass p, position id ``pos_i + p``):

    pass 0            x_i                      -> base prediction of x_{i+1}
    pass 1            START                    -> predicts t_1
    pass 1+j          t_j      (j = 1..k)      -> predicts t_{j+1} (t_k's output is unused: END is forced)
    pass k+2          END                      -> post-thought prediction of x_{i+1}
    pass k+2+s        x_{i+s}  (s = 1..A-1)    -> post-thought prediction of x_{i+1+s}

With position selection (``select`` / ``rows``, see ``quietstar.method.selection``) the text pass runs
over all L tokens and every later pass over the S selected positions' rows only: pass p's block
then has S tokens, row r that of position i = rows.index[b, r], at position id pos_i + p.
A ``thought_prefix`` of m tokens sits at passes 2..m+1 (after START), shifting the later passes
by m; an early-ended thought shifts its own row's END and teacher-forced passes back (see
``Rollout``).

Cost of the thought part, for S thinking rows per sequence (W = L without selection), k thought
tokens, a prefix of m and A ahead tokens, per layer: keys and values of L text tokens once plus
S per pass (m + k + A + 1 passes: O(S (m + k + A)) memory, linear in k); activations of
O(S (m + k + A)) tokens; the thought attention of pass p reads the text keys of its position
and its own p keys: O(S (m + k + A)(L + m + k + A)) time, whose own-thought part, quadratic in k
as in any causal model, is a product of S x p scores per pass, small next to the projections'
O(S k d) while k is below ~d. k + 1 decoder calls (k + 2 with selection: the text pass first).

A ``Rollout`` holds what the passes need of the model and does not change between calls (the
model builds one, ``QuietStarForCausalLM.rollout``). Two ways to run it, equal to float tolerance:

- ``Rollout.sample_and_score`` (training): the passes run with gradients while the thought is
  sampled, one call per thought token (text and START share the first call, the A + 1 passes
  after the last sampled token share the last), every layer's keys kept per pass in the
  layout's key store. Each pass is computed once, as in F plain forward passes.
- ``Rollout.sample`` + ``Rollout.score``: sample without gradients, then score all F = k + A + 2
  passes as ONE forward over an [F*L]-token sequence. Fixed thoughts (``score_thoughts``) need
  only the second half; activation checkpointing needs a single forward to recompute.
- ``Rollout.text_pass`` + ``Rollout.sample_after_text`` + ``Rollout.score_rows`` (rlp / rpt
  training, ``TrainConfig.thought_tokens_per_backward``): pass 0 once per text, not once per
  thought; sampling without gradients over its keys; then passes 1..F-1 of any group of rows in
  one forward against those keys (or against detached copies of them, so that each group's
  graph can be run backward alone: ``method.held_gradients``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from torch import nn

from quietstar.method.attention import ThoughtLayout
from quietstar.method.thought_layout import PassKeys
from quietstar.method.selection import ThoughtRows
from quietstar.method.vocab import VocabHead


@dataclass
class TextPass:
    """Pass 0 of B texts run alone (``Rollout.text_pass``)."""

    hidden: torch.Tensor  # [B, L, d] final hidden states: the base prediction of x_{i+1}
    keys: dict            # attention module -> (key, value), [B, Hkv, L, D] each

    def detached(self) -> tuple["TextPass", list[torch.Tensor]]:
        """A copy whose keys and values are new leaves that require grad (and the leaves, keys
        then values per layer): the thoughts' graphs end there, so each can be run backward
        alone, and the leaves' gradients are what the text pass's own backward takes."""
        keys = {module: (key.detach().requires_grad_(), value.detach().requires_grad_())
                for module, (key, value) in self.keys.items()}
        return TextPass(self.hidden.detach(), keys), [t for pair in keys.values() for t in pair]

    def tensors(self) -> list[torch.Tensor]:
        """The keys and values, in ``detached``'s order."""
        return [t for pair in self.keys.values() for t in pair]


@dataclass
class GridHidden:
    """Final hidden states of a scored rollout."""

    base: torch.Tensor | None  # [B, L, d]  text pass: predicts x_{i+1} without a thought
                               #            (None from ``Rollout.score_rows``: the text pass's own)
    thought: torch.Tensor   # [B, W, k, d]  passes 1..k: predict t_1..t_k
    after: torch.Tensor     # [B, W, A, d]  after END and s true tokens: predict x_{i+1+s}
    rows: ThoughtRows | None = None  # the positions of the W thought rows; None: all (W = L)
    thought_mask: torch.Tensor | None = None  # [B, W, k] the thought's own ids (early end); None: all


def rollout_positions(length: int, thought_tokens: int, ahead_tokens: int) -> int:
    """Position ids a rollout over ``length`` text tokens uses: its last pass (the last
    teacher-forced token after a ``thought_tokens``-token thought) sits at position
    length - 1 + k + A + 1."""
    return length + thought_tokens + ahead_tokens + 1


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token (left padding safe)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _Passes:
    """Runs the passes of one rollout, in order, one or several per call."""

    def __init__(self, decoder, embed, attention_mask: torch.Tensor, keep_keys: bool,
                 rows: ThoughtRows | None = None):
        self.decoder, self.embed = decoder, embed
        self.positions = text_positions(attention_mask)
        self.valid = attention_mask.bool()
        self.padded = not bool(self.valid.all())
        self.key_store = {} if keep_keys else None
        self.rows = rows  # the thinking positions; may be set after the text pass (selection by entropy)
        self.done = 0
        self.flash_own = False  # ThoughtLayout.flash_own

    def __call__(self, ids: torch.Tensor | None, text: torch.Tensor | None = None):
        """Runs the next passes: ``text`` [B, L] (pass 0, first call only), then ``ids`` [B, P, W]
        (P thought passes over the W rows: every position, or ``rows``). Returns the final hidden
        states (of the text [B, L, d] or None, of the thought passes [B, P, W, d] or None)."""
        blocks, positions = [], []
        first = self.done + (text is not None)
        if text is not None:
            blocks.append(text)
            positions.append(self.positions)
        P = 0
        if ids is not None:
            B, P, W = ids.shape
            row_positions = self.positions if self.rows is None else self.rows.gather(self.positions)
            offsets = torch.arange(first, first + P, device=ids.device)
            blocks.append(ids.reshape(B, P * W))
            positions.append((row_positions[:, None, :] + offsets[None, :, None]).reshape(B, P * W))
        ids_all = torch.cat(blocks, 1)
        B, L = ids_all.shape[0], self.positions.shape[1]
        layout = ThoughtLayout(L, tuple(range(self.done, first + P)), self.valid, self.positions,
                               self.padded, self.key_store, None if self.rows is None else self.rows.index,
                               self.flash_own)
        # A ready 4-D mask stops transformers from building its own; the real pattern is the layout's.
        dummy_mask = torch.ones(B, 1, 1, 1, dtype=torch.bool, device=ids_all.device)
        hidden = self.decoder(inputs_embeds=self.embed(ids_all), attention_mask=dummy_mask,
                              position_ids=torch.cat(positions, 1), use_cache=False,
                              thought_layout=layout).last_hidden_state
        self.done = first + P
        text_hidden = hidden[:, :L] if text is not None else None
        rest = hidden[:, L if text is not None else 0:].view(B, P, W, -1) if P else None
        return text_hidden, rest


@dataclass(frozen=True)
class Rollout:
    """The thought rollout of a model: its decoder (token vectors -> final hidden states), its
    embedding (meta tokens included), its LM head (samples the thought tokens, gives the entropy
    that chooses where to think), the START / END ids, A (``ahead_tokens``) and the pad id.

    ``select`` (of ``sample`` and ``sample_and_score``: the text's final hidden states [B, L, d]
    -> ThoughtRows, see ``selection.thought_rows_chooser``) picks the thinking positions once
    the text pass has run; without it all L think.

    ``prefix_ids`` (m tokens, ``QuietStarConfig.thought_prefix``) are forced after START, before
    the k sampled tokens: a thought is START p_1..p_m t_1..t_k END, F = m + k + A + 2 passes.
    ``stop_ids`` (``QuietStarConfig.thought_can_end``: END where the head has a row for it, and
    EOS) end a thought early: the first one sampled, at t_j, is the thought's last action (its
    log-probability counts) and the thought's text is t_1..t_{j-1}; END is fed next, then the
    teacher-forced tokens, each row's schedule shifted by its own length (so each row's passes
    see exactly START, its prefix, its own tokens, END, x_{i+1}.., as one sequence would, at the
    same position ids); what the row's later passes compute is never read, and its sampled ids
    after t_j are the pad id. ``GridHidden.thought_mask`` says which of the k ids are the
    thought's own.
    """

    decoder: nn.Module
    embed: nn.Module
    head: VocabHead
    start_id: int
    end_id: int
    ahead_tokens: int
    pad_id: int
    prefix_ids: tuple[int, ...] = ()
    stop_ids: tuple[int, ...] = ()

    @property
    def thought_head(self) -> VocabHead:
        """The head the thought tokens are sampled from and scored by: ``head``, with END
        sampleable when it ends a thought (``stop_ids``)."""
        if self.end_id not in self.stop_ids:
            return self.head
        return replace(self.head, masked_ids=self.head.masked_ids[self.head.masked_ids != self.end_id])

    @torch.no_grad()
    def sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, num_tokens: int,
               temperature: float, generator: torch.Generator | None = None,
               select=None) -> tuple[torch.Tensor, ThoughtRows | None]:
        """Samples a k-token thought (k = ``num_tokens``) after every position, or after those
        ``select`` picks: returns (ids [B, W, k], the W rows' ThoughtRows or None for all L).

        The head masks the meta tokens, so they are never sampled inside a thought (END is, with
        ``stop_ids``). The text's keys/values are computed once and every pass adds one key per
        thinking position.
        """
        run = _Passes(self.decoder, self.embed, attention_mask, keep_keys=True)
        thoughts = self._sample_passes(run, input_ids, num_tokens, temperature, generator, None, select)[0]
        return thoughts, run.rows

    def sample_and_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, num_tokens: int,
                         temperature: float, generator: torch.Generator | None = None,
                         logprob_temperature: float | None = 1.0, select=None):
        """Samples thoughts and scores them in the same passes, with gradients; at every position,
        or at those ``select`` picks after the text pass.

        Returns (thoughts [B, W, k], GridHidden, the thought tokens' log-probabilities at
        ``logprob_temperature`` [B, W, k], or None without it): the REINFORCE log-probabilities
        come from the chunks of logits the tokens were sampled from, so no [tokens x V] tensor is
        kept for them.
        Not under activation checkpointing: recomputing a call would store its keys twice.
        """
        k, m = num_tokens, len(self.prefix_ids)
        run = _Passes(self.decoder, self.embed, attention_mask, keep_keys=True)
        thoughts, base, hidden, thought_logp, fed = self._sample_passes(
            run, input_ids, k, temperature, generator, logprob_temperature, select)
        ids = self.pass_ids(input_ids, thoughts, run.rows, fed)
        rest = run(ids[:, m + k:])[1]  # t_k, END and the teacher-forced tokens: [B, A + 1, W, d]
        thought = torch.stack(hidden, dim=2)                                   # [B, W, k, d]
        if fed is None:
            after = rest[:, 1:].transpose(1, 2)
        else:  # passes m+1 .. F-1; a row's END sits c passes after its first thought pass
            after = self._after(torch.cat([thought.transpose(1, 2), rest], 1), fed)
        grid = GridHidden(base=base, thought=thought, after=after, rows=run.rows,
                          thought_mask=self.thought_mask(thoughts, fed))
        return thoughts, grid, thought_logp

    def score(self, input_ids: torch.Tensor, thought_ids: torch.Tensor, attention_mask: torch.Tensor,
              rows: ThoughtRows | None = None) -> GridHidden:
        """All F passes as one forward with gradients, for thoughts ``thought_ids`` [B, W, k] at
        every position or at ``rows``: returns the hidden states that matter. With ``stop_ids``
        a thought ends at its first stop id (the ids after it are not read)."""
        fed = self.fed_tokens(thought_ids)
        ids = self.pass_ids(input_ids, thought_ids, rows, fed)
        base, hidden = _Passes(self.decoder, self.embed, attention_mask, keep_keys=False, rows=rows)(
            ids, text=input_ids)
        return self._grid(base, hidden, thought_ids, rows, fed)

    def text_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextPass:
        """Pass 0 alone, with gradients: the text's final hidden states and every layer's keys
        and values, for ``score_rows`` to score thoughts against, a group of rows at a time."""
        run = _Passes(self.decoder, self.embed, attention_mask, keep_keys=True)
        base, _ = run(None, text=input_ids)
        return TextPass(base, {module: (keys.text_key, keys.text_value) for module, keys in run.key_store.items()})

    def score_rows(self, text: TextPass, input_ids: torch.Tensor, thought_ids: torch.Tensor,
                   attention_mask: torch.Tensor, rows: ThoughtRows) -> GridHidden:
        """``score`` of thoughts ``thought_ids`` [B*n, W, k] at ``rows`` against a ``text_pass`` of
        the B texts (``input_ids`` / ``attention_mask``: the texts repeated n times, adjacent):
        passes 1..F-1 in one forward, the text's keys repeated for the n thoughts of a position
        (a view's copy: their gradients reach ``text``'s keys). ``GridHidden.base`` is None."""
        fed = self.fed_tokens(thought_ids)
        ids = self.pass_ids(input_ids, thought_ids, rows, fed)
        run = self._after_text(text, attention_mask, rows)
        run.flash_own = True  # every thought pass in this one call: their own part by the flash kernel
        _, hidden = run(ids)
        return self._grid(None, hidden, thought_ids, rows, fed)

    def sample_after_text(self, text: TextPass, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                          num_tokens: int, temperature: float, generator: torch.Generator | None = None,
                          select=None) -> tuple[torch.Tensor, ThoughtRows | None]:
        """``sample`` on the texts of a ``text_pass`` (``input_ids`` / ``attention_mask``: them
        repeated n times, adjacent), reading its keys instead of running pass 0 again: the same
        draws from ``generator`` as ``sample`` and ``sample_and_score``."""
        with torch.inference_mode():  # lighter than no_grad for k small calls; the results are copied out
            run = self._after_text(text, attention_mask, None)
            n = input_ids.shape[0] // text.hidden.shape[0]
            thoughts = self._sample_passes(run, input_ids, num_tokens, temperature, generator, None, select,
                                           base=text.hidden.repeat_interleave(n, 0))[0]
        rows = None if run.rows is None else ThoughtRows(run.rows.index.clone(), run.rows.valid.clone())
        return thoughts.clone(), rows

    def _after_text(self, text: TextPass, attention_mask: torch.Tensor, rows: ThoughtRows | None) -> _Passes:
        """The passes after ``text``'s (``attention_mask``: of its texts repeated n times): its
        keys repeated for the n thoughts of a position (their gradients reach ``text``'s keys)."""
        n = attention_mask.shape[0] // text.hidden.shape[0]
        run = _Passes(self.decoder, self.embed, attention_mask, keep_keys=True, rows=rows)
        run.key_store = {module: PassKeys.of_text(key.repeat_interleave(n, 0), value.repeat_interleave(n, 0))
                         for module, (key, value) in text.keys.items()}
        run.done = 1  # the text's pass is in the store
        return run

    def _grid(self, base, hidden: torch.Tensor, thought_ids: torch.Tensor, rows: ThoughtRows | None,
              fed: torch.Tensor | None) -> GridHidden:
        """The GridHidden of passes 1..F-1's outputs ``hidden`` [B, F - 1, W, d]."""
        k, m = thought_ids.shape[-1], len(self.prefix_ids)
        hidden = hidden[:, m:]  # passes m+1 .. F-1: the first predicts t_1
        after = (hidden[:, k + 1:k + 1 + self.ahead_tokens].transpose(1, 2) if fed is None
                 else self._after(hidden, fed))
        return GridHidden(base=base, thought=hidden[:, :k].transpose(1, 2), after=after, rows=rows,
                          thought_mask=self.thought_mask(thought_ids, fed))

    def fed_tokens(self, thought_ids: torch.Tensor) -> torch.Tensor | None:
        """c [B, W]: how many of each thought's k ids are fed as its text, the ids before its
        first stop id (k if none); None without ``stop_ids`` (always k)."""
        if not self.stop_ids:
            return None
        k = thought_ids.shape[-1]
        stop = torch.isin(thought_ids, torch.tensor(self.stop_ids, device=thought_ids.device))
        index = torch.arange(k, device=thought_ids.device).expand_as(thought_ids)
        return torch.where(stop, index, k).amin(-1)                            # [B, W]

    def thought_mask(self, thought_ids: torch.Tensor, fed: torch.Tensor | None) -> torch.Tensor | None:
        """[B, W, k] bool: the thought's own ids, its text and the stop id that ended it (its
        choice to stop is an action of the policy); None: all k."""
        if fed is None:
            return None
        k = thought_ids.shape[-1]
        own = (fed + (fed < k).long())[..., None]                             # [B, W, 1]
        return torch.arange(k, device=thought_ids.device) < own

    def _after(self, hidden: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
        """[B, W, A, d]: from the outputs of passes m+1 .. F-1, [B, k + A + 1, W, d], those of
        each row's END and teacher-forced passes (at c + 1 + s)."""
        B, _, W, d = hidden.shape
        index = fed[:, None, :] + 1 + torch.arange(self.ahead_tokens, device=fed.device)[None, :, None]
        picked = hidden.gather(1, index[..., None].expand(B, self.ahead_tokens, W, d))  # [B, A, W, d]
        return picked.transpose(1, 2)

    def _tail(self, input_ids: torch.Tensor, rows: ThoughtRows | None) -> list[torch.Tensor]:
        """The A inputs after a thought, [B, W] each: END, then the teacher-forced x_{i+s}."""
        B, L = input_ids.shape
        W = L if rows is None else rows.index.shape[1]
        tail = [input_ids.new_full((B, W), self.end_id)]
        for s in range(1, self.ahead_tokens):
            # Teacher-forced x_{i+s}; beyond the text a pad token, whose predictions are masked out.
            shifted = torch.cat([input_ids[:, s:], input_ids.new_full((B, min(s, L)), self.pad_id)], 1)[:, :L]
            tail.append(shifted if rows is None else rows.gather(shifted))
        return tail

    def _head_ids(self, like: torch.Tensor) -> torch.Tensor:
        """[B, m + 1, W]: START and the prefix, for rows shaped like ``like`` [B, W]."""
        return torch.stack([torch.full_like(like, t) for t in (self.start_id, *self.prefix_ids)], dim=1)

    def pass_ids(self, input_ids: torch.Tensor, thought_ids: torch.Tensor,
                 rows: ThoughtRows | None = None, fed: torch.Tensor | None = None) -> torch.Tensor:
        """The [B, F - 1, W] input ids of passes 1..F-1 (see the module docstring) for thoughts
        ``thought_ids`` [B, W, k] at every position (W = L) or at ``rows``; with ``fed`` [B, W]
        (``fed_tokens``) each row's END follows its own c tokens, pad ids after its last pass."""
        B, W, k = thought_ids.shape
        head = self._head_ids(thought_ids[..., 0] if k else input_ids.new_zeros(B, W))
        tail = torch.stack(self._tail(input_ids, rows), dim=1)                # [B, A, W]
        if fed is None:
            return torch.cat([head, thought_ids.transpose(1, 2), tail], dim=1)
        A = self.ahead_tokens
        r = torch.arange(k + A, device=fed.device)[None, :, None]              # [1, k + A, 1]
        c = fed[:, None, :]                                                   # [B, 1, W]
        own = thought_ids.transpose(1, 2).gather(1, r.clamp(max=k - 1).expand(B, k + A, W))
        after = tail.gather(1, (r - c).clamp(0, A - 1).expand(B, k + A, W))
        body = torch.where(r < c, own, torch.where(r - c < A, after, torch.full_like(after, self.pad_id)))
        return torch.cat([head, body], dim=1)

    def _sample_passes(self, run: _Passes, input_ids, num_tokens: int, temperature: float, generator,
                       logprob_temperature: float | None, select, base: torch.Tensor | None = None):
        """Runs passes 0..m+k (text, START, the prefix, t_1..t_{k-1}) and samples t_j from pass
        m+j's output.

        Without ``select`` (and without ``run.rows``) the text shares its call with START and the
        prefix. Returns the thoughts [B, W, k], the text's hidden states [B, L, d], those of
        passes m+1..m+k ([B, W, d] each), with ``logprob_temperature`` the thought tokens'
        log-probabilities at that temperature [B, W, k] (with gradients; from the chunks of
        logits they were sampled from) else None, and with ``stop_ids`` c [B, W] (``fed_tokens``)
        else None. ``base``: the text's hidden states where ``run`` holds its pass already."""
        B, L = input_ids.shape
        if base is None and select is None and run.rows is None and num_tokens > 0:
            base, first = run(self._head_ids(input_ids), text=input_ids)
        else:
            if base is None:
                base, _ = run(None, text=input_ids)
            if select is not None:
                run.rows = select(base)
            W = L if run.rows is None else run.rows.index.shape[1]
            if num_tokens == 0:
                return input_ids.new_zeros(B, W, 0), base, [], None, None
            first = run(self._head_ids(input_ids.new_zeros(B, W)))[1]
        hidden = [first[:, -1]]
        tokens, logps = [], []
        head = self.thought_head
        stops = torch.tensor(self.stop_ids, device=input_ids.device) if self.stop_ids else None
        fed = tail = None
        if stops is not None:
            fed = torch.full(hidden[0].shape[:2], num_tokens, dtype=torch.long, device=input_ids.device)
            tail = torch.stack(self._tail(input_ids, run.rows), 0)                # [A, B, W]
        for j in range(1, num_tokens + 1):
            token, logp = head.sample(hidden[j - 1], temperature, generator, logprob_temperature)  # [B, W]
            next_input = token
            if stops is not None:
                ended = fed < num_tokens                 # at an earlier step: padding from here on
                token = token.masked_fill(ended, self.pad_id)
                fed = torch.where(~ended & torch.isin(token, stops), j - 1, fed)
                # pass m+j+1 feeds t_j while j - 1 < c, then END and the teacher-forced tokens, then pad
                past = (j - 1) - fed                                               # [B, W]
                forced = tail.gather(0, past.clamp(0, tail.shape[0] - 1)[None])[0]
                next_input = torch.where(past < 0, token, torch.where(past < tail.shape[0], forced, self.pad_id))
            tokens.append(token)
            logps.append(logp)
            if j < num_tokens:
                hidden.append(run(next_input[:, None])[1][:, 0])
        thought_logp = torch.stack(logps, dim=-1) if logprob_temperature is not None else None
        return torch.stack(tokens, dim=-1), base, hidden, thought_logp, fed
