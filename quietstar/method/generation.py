"""Thinking generation: a thought before every new token, on one key/value cache.

For each new token the model (1) reads the latest token, which gives its base hidden state
``h_base``; (2) thinks on top of the cache: START, k sampled thought tokens, END, whose last
hidden state is ``h_thought``; (3) mixes the two (``model.mix``: the mixing head; for rlp / rpt the
post-thought state itself) and picks the next token
from the mixed logits; (4) drops the k + 2 thought entries from the cache, so no later token
ever sees a thought. Position ids follow the text alone (a thought after the token at position
p sits at p+1 .. p+k+2, exactly as in training), so the numbers equal ``score_thoughts``.

Inputs whose values are known in advance share a model call: the new token x travels with
START ([x, START]: x's output is h_base, START's predicts t_1), and the last thought token with
END ([t_k, END]: t_k's output is not needed, END always comes next). A new token thus costs k + 1
cached forward calls instead of k + 3 (x, START, t_1..t_k, END one by one); the calls are
memory-bound on the weights, so two tokens cost about as much as one.

With ``thought_threshold`` > 0 a token is thought about only where the base prediction (from
``h_base``, before any thought) has an entropy above the threshold: the paper finds thoughts help
the difficult tokens. Otherwise START's cache entry is dropped again and the base prediction picks
the token, at the cost of one call. A batch thinks when any of its rows needs to; the rows below
the threshold then still take the base prediction.

With ``QuietStarConfig.thought_can_end`` (rlp / rpt) a row's thought ends where training's and
``score_thoughts``' do (``Rollout.fed_tokens``: at its first END or EOS): END is fed in place of
that stop, at the position right after the row's own tokens, and its state is the row's
post-thought state; rows that ended wait on the pad id (dropped unread) until the last row's
thought ends, and when all have ended early no further call is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from quietstar.method.rollout import text_positions
from quietstar.utils.batching import check_padding_masked
from quietstar.method.sampling import sample
from quietstar.method.selection import logits_entropy
from quietstar.utils.modes import eval_mode
from quietstar.utils.errors import QuietStarInputError


@dataclass
class GenerateOutput:
    """What ``generate`` returns when asked for more than the token ids."""

    sequences: torch.Tensor                 # [B, L + N] prompt and new tokens (pad after eos)
    thought_ids: torch.Tensor | None        # [B, N, k] the thought behind each new token (pad: none; with
                                            # thought_can_end its stop kept, pad after it)
    thoughts: list[list[str]] | None        # [B][N] those thoughts' texts decoded ("" where none)
    mixing_weight: torch.Tensor | None      # [B, N] w of each new token (0 after eos or without a thought)
    logits: tuple[torch.Tensor, ...] | None  # N x [B, V] mixed logits each token was chosen from
    thought_taken: torch.Tensor | None = None  # [B, N] bool: a thought preceded the token


class _CachedDecoder:
    """The LM's decoder on one growing key/value cache, fed a few tokens per call."""

    def __init__(self, model, attention_mask: torch.Tensor, capacity: int):
        self.decoder = model.decoder
        # No config: a sliding-window cache would evict text keys while a thought is appended.
        self.cache = DynamicCache()
        self.length = 0
        B, L = attention_mask.shape
        if bool(attention_mask.all()):
            # No padding: leave the masks to the model, which then skips them where it can.
            self.mask = None
        else:
            # One 2-D key-padding mask for the whole run; each call passes a view of its prefix.
            self.mask = torch.ones(B, L + capacity, dtype=torch.bool, device=attention_mask.device)
            self.mask[:, :L] = attention_mask.bool()

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.length += embeds.shape[1]
        mask = None if self.mask is None else self.mask[:, :self.length]
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                           cache=self.cache, use_cache=True)
        return out.last_hidden_state

    def drop_last(self, n: int) -> None:
        """Forgets the last n cached tokens (a thought)."""
        self.cache.crop(-n)
        self.length -= n


def _check_inputs(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                  top_p, thought_threshold):
    """Refuses inputs generation cannot honour (the thought settings: ``thought_settings``)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise QuietStarInputError(f"input_ids must be [batch, length] with length >= 1, got shape "
                                  f"{tuple(input_ids.shape)}")
    tok = model.tokenizer
    check_padding_masked(input_ids, attention_mask, tok.pad_token_id, (tok.eos_token_id, tok.bos_token_id))
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise QuietStarInputError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                                  f"{tuple(input_ids.shape)}; they must match")
    if attention_mask is not None and not attention_mask[:, -1].all():
        raise QuietStarInputError("the prompts are right-padded; pad on the left for generation "
                                  "(tokenizer.padding_side = 'left')")
    if ((input_ids == model.start_id) | (input_ids == model.end_id)).any():
        raise QuietStarInputError("input_ids contain the thought meta tokens; prompts must not: thoughts are "
                                  "inserted by the model")
    if max_new_tokens < 0:
        raise QuietStarInputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise QuietStarInputError(f"temperature must be > 0 when sampling, got {temperature}; use "
                                  "do_sample=False for greedy decoding")
    if not do_sample and (top_k is not None or top_p is not None):
        raise QuietStarInputError("top_k / top_p only apply when sampling; pass do_sample=True")
    if top_k is not None and top_k < 1:
        raise QuietStarInputError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise QuietStarInputError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(thought_threshold, bool) or not isinstance(thought_threshold, (int, float)) or not (
            math.isfinite(thought_threshold) and thought_threshold >= 0):
        raise QuietStarInputError(f"thought_threshold must be a finite number >= 0 (nats of the base prediction's "
                                  f"entropy; 0 = think before every token), got {thought_threshold!r}")


def generation_positions(prompt_length: int, max_new_tokens: int, thought_tokens: int, *,
                         prefix_tokens: int) -> int:
    """Position ids that generating ``max_new_tokens`` after a ``prompt_length``-token prompt with
    ``thought_tokens``-token thoughts, each opened by a ``prefix_tokens``-token thought_prefix
    (``QuietStarConfig.thought_prefix_ids``), may use: the last token fed is the last-but-one new
    one, at L + N - 2, and its thought (START, the prefix, k tokens, END) ends m + k + 2 positions
    further; without thoughts (k = 0) there is no prefix either."""
    L, N, k, m = prompt_length, max_new_tokens, thought_tokens, prefix_tokens
    return L + max(N - 1, 0) + (m + k + 2 if k and N else 0)


def _special_ids(model, eos_token_id):
    """(list of eos ids, pad id), defaulting as transformers' ``generate`` does."""
    gen_config = getattr(model.lm, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gen_config, "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = model.tokenizer.eos_token_id
    pad = getattr(gen_config, "pad_token_id", None)
    if pad is None:
        pad = model.tokenizer.pad_token_id
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, pad


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    streamer=None,
    thought_temperature: float | None = None,
    thought_tokens: int | None = None,
    thought_threshold: float = 0.0,
    return_thoughts: bool = False,
    output_logits: bool = False,
    generator: torch.Generator | None = None,
    allow_position_extrapolation: bool | None = None,
):
    """Generates up to ``max_new_tokens`` tokens, thinking before each one.

    Args:
        model: a ``QuietStarForCausalLM``.
        input_ids: [B, L] prompts, left-padded when their lengths differ.
        attention_mask: [B, L], 0 on padding; None means no padding.
        do_sample, temperature, top_k, top_p: how the next token is chosen from the mixed logits
            (greedy by default), as in transformers' ``generate``.
        eos_token_id: id(s) that end a row; defaults to the LM's generation config, then the
            tokenizer's eos. Finished rows are filled with the pad id; generation stops when
            every row has finished.
        streamer: a transformers streamer (``put``/``end``), given the prompt, then every new
            token. If it also has ``put_thought(thought_ids)``, each token's thought [k] (its
            text: the ids before the stop that ended it, with ``thought_can_end``) is passed to
            it just before the token (batch of one only).
        thought_temperature: temperature of thought tokens (0 = greedy); default
            ``model.config.thought_temperature``.
        thought_tokens: k, tokens sampled per thought; default
            ``model.config.sampled_thought_tokens``. 0 runs the plain base model.
        thought_threshold: think only before tokens whose base prediction (no thought) has an
            entropy above this many nats; the others are chosen from the base prediction. 0
            (the default) thinks before every token.
        return_thoughts: also return each token's thought ids, text and mixing weight, and which
            tokens thought.
        output_logits: also return the mixed logits of every step (before temperature/top-k/p).
        generator: random generator for thought and token sampling.
        allow_position_extrapolation: let a rotary model generate past its
            max_position_embeddings (refused otherwise, before any work); default
            ``model.config.allow_position_extrapolation``.

    Returns:
        [B, L + N] token ids, or a ``GenerateOutput`` if ``return_thoughts`` or ``output_logits``.
    """
    _check_inputs(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                  top_p, thought_threshold)
    k, thought_t = model.config.thought_settings(thought_tokens, thought_temperature)
    m = len(model.thought_prefix_ids) if k else 0  # the thought_prefix's tokens, after START
    L, N = input_ids.shape[1], max_new_tokens
    model.check_positions(generation_positions(L, N, k, prefix_tokens=m),
                          f"generating {N} tokens after a {L}-token prompt", allow_position_extrapolation)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    show_thoughts = hasattr(streamer, "put_thought") and k > 0
    if show_thoughts and input_ids.shape[0] > 1:
        raise QuietStarInputError(f"a streamer that shows thoughts takes one prompt at a time, got "
                                  f"{input_ids.shape[0]}")
    eos, pad = _special_ids(model, eos_token_id)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        return sample(logits, temperature if do_sample else 0.0, generator, top_k, top_p)

    with eval_mode(model):  # no dropout
        decoder = _CachedDecoder(model, attention_mask, max_new_tokens + m + k + 2)
        thinker = (_Thinker(model, decoder, k, thought_t, generator, input_ids.device, thought_threshold)
                   if k > 0 else None)
        steps = _Steps(keep_thoughts=thinker is not None and return_thoughts, keep_logits=output_logits)
        _run_steps(model, decoder, thinker, input_ids, attention_mask, max_new_tokens, choose, eos, pad,
                   streamer, show_thoughts, steps)
    return _outputs(model, input_ids, steps, k, return_thoughts, output_logits)


@dataclass
class _Steps:
    """What the step loop collects, one entry per new token: [B] tokens, and where asked for,
    [B, k] thoughts, [B] mixing weights, [B] whether a thought was taken (all blanked after eos)
    and [B, V] mixed logits."""

    keep_thoughts: bool
    keep_logits: bool
    tokens: list = field(default_factory=list)
    thoughts: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    taken: list = field(default_factory=list)
    logits: list = field(default_factory=list)


def _run_steps(model, decoder, thinker, input_ids, attention_mask, max_new_tokens, choose, eos, pad,
               streamer, show_thoughts, steps: _Steps) -> None:
    """The generation loop: one new token per step for every row, until ``max_new_tokens`` or
    every row has ended; rows that ended get the pad id."""
    B, device = input_ids.shape[0], input_ids.device
    eos = torch.tensor(eos, device=device) if eos else None
    # Prompts are checked and meta tokens never sampled, so every id fed to the LM except
    # START/END (which the thinker adds) is an ordinary token of the base embedding.
    embed = model.embedding.base
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    ids, positions = input_ids, text_positions(attention_mask)
    for _ in range(max_new_tokens):
        if thinker is None:
            logits = model.logits(decoder(embed(ids), positions)[:, -1])
        else:
            logits, thought, w, taken = thinker(embed(ids), positions)
        logits = logits.float()
        token = choose(logits)
        if eos is not None:
            token = token.masked_fill(~unfinished, pad)
        steps.tokens.append(token)
        if steps.keep_logits:
            steps.logits.append(logits)
        if steps.keep_thoughts:
            steps.thoughts.append(thought.masked_fill(~(unfinished & taken)[:, None], pad))
            steps.weights.append(w.float().masked_fill(~unfinished, 0.0))
            steps.taken.append(taken & unfinished)
        if show_thoughts and taken[0]:
            streamer.put_thought(torch.tensor(_thought_texts(thinker.rollout, thought[:1])[0], dtype=torch.long))
        if streamer is not None:
            streamer.put(token.cpu())
        if eos is not None:
            unfinished = unfinished & ~torch.isin(token, eos)
            if not unfinished.any():
                break
        ids, positions = token[:, None], positions[:, -1:] + 1
    if streamer is not None:
        streamer.end()


def _outputs(model, input_ids, steps: _Steps, k: int, return_thoughts: bool, output_logits: bool):
    """``generate``'s result: the token ids, or a ``GenerateOutput`` with what was asked for."""
    sequences = torch.cat([input_ids, *[t[:, None] for t in steps.tokens]], dim=1)
    if not (return_thoughts or output_logits):
        return sequences
    out = GenerateOutput(sequences, None, None, None, tuple(steps.logits) if output_logits else None)
    if return_thoughts:
        B, N = input_ids.shape[0], len(steps.tokens)
        out.thought_ids = (torch.stack(steps.thoughts, 1) if steps.thoughts
                           else input_ids.new_zeros(B, N, k))
        out.mixing_weight = (torch.stack(steps.weights, 1) if steps.weights
                             else torch.zeros(B, N, device=input_ids.device))
        out.thought_taken = (torch.stack(steps.taken, 1) if steps.taken
                             else torch.zeros(B, N, dtype=torch.bool, device=input_ids.device))
        texts = _thought_texts(model.rollout, out.thought_ids)                 # B * N, row-major
        taken = out.thought_taken.reshape(-1).tolist()
        decoded = [model.tokenizer.decode(t) if took else "" for t, took in zip(texts, taken)]
        out.thoughts = [decoded[b * N:(b + 1) * N] for b in range(B)]
    return out


def _thought_texts(rollout, thought_ids: torch.Tensor) -> list[list[int]]:
    """The text of each thought of ``thought_ids`` [..., k], in row-major order: its ids before
    the stop that ended it (``Rollout.fed_tokens``, the rule training reads thoughts by), all k
    without ``thought_can_end``."""
    k = thought_ids.shape[-1]
    fed = rollout.fed_tokens(thought_ids) if k else None
    ids = thought_ids.flatten(0, -2).tolist()
    lengths = [k] * len(ids) if fed is None else fed.reshape(-1).tolist()
    return [t[:c] for t, c in zip(ids, lengths)]


class _Thinker:
    """One thought on top of the cache, for the latest text token of every row.

    Called with the embeddings and positions of the newest text tokens (the whole prompt at the
    first step, then the chosen token), it feeds them together with START, samples t_1..t_k,
    feeds [t_k, END], and returns the mixed logits [B, V], the thought [B, k], the mixing
    weight [B] and which rows thought [B] (with a ``threshold``, see the module docstring; rows
    that did not predict with the base, weight 0). The thought's cache entries are dropped again
    before it returns. With ``QuietStarConfig.thought_can_end`` a row's thought ends where
    training's does (``_think_until_stop``).
    """

    def __init__(self, model, decoder: _CachedDecoder, k: int, temperature: float, generator, device,
                 threshold: float = 0.0):
        self.model, self.decoder, self.k = model, decoder, k
        self.temperature, self.generator, self.threshold = temperature, generator, threshold
        self.rollout = model.rollout  # the stop rule (thought_can_end)
        self.head = self.rollout.thought_head  # END sampleable where it ends a thought
        self.meta = model.embedding(torch.tensor([model.start_id, model.end_id], device=device))
        # the thought_prefix, forced after START as in training (m tokens)
        self.prefix = model.embedding(torch.tensor(model.thought_prefix_ids, dtype=torch.long, device=device))
        self.m = len(model.thought_prefix_ids)
        self.offsets = torch.arange(k + 3 + self.m, device=device)  # x, START, prefix, t_1..t_k, END

    def __call__(self, text_embeds: torch.Tensor, text_positions: torch.Tensor):
        model, decoder, k, m = self.model, self.decoder, self.k, self.m
        B = text_embeds.shape[0]
        start, end = self.meta.to(text_embeds.dtype)[:, None, None].expand(2, B, 1, -1)
        prefix = self.prefix.to(text_embeds.dtype)[None].expand(B, m, -1)
        pos = text_positions[:, -1:] + self.offsets  # [B, m + k + 3], the last text token's first
        hidden = decoder(torch.cat([text_embeds, start, prefix], 1),
                         torch.cat([text_positions, pos[:, 1:2 + m]], 1))
        text_length = decoder.length - 1 - m  # the cache's entries up to the text: the thought's follow
        h_base = hidden[:, -2 - m]
        think = torch.ones(B, dtype=torch.bool, device=h_base.device)
        if self.threshold > 0:  # think only where the base prediction is unsure enough
            base_logits = model.logits(h_base)
            think = logits_entropy(base_logits) > self.threshold
            if not think.any():
                decoder.drop_last(1 + m)  # START's and the prefix's entries
                return (base_logits, text_positions.new_zeros(B, k), h_base.new_zeros(B), think)
        if self.rollout.stop_ids:
            thought, h_thought = self._think_until_stop(hidden[:, -1], pos)
        else:
            thought, h_thought = self._think(hidden[:, -1], pos, end)
        mixed, w = model.mix(h_base, h_thought)
        decoder.drop_last(decoder.length - text_length)
        logits = model.logits(mixed)
        if self.threshold > 0:  # the rows below the threshold predict with the base
            logits = torch.where(think[:, None], logits, base_logits)
            w = w.masked_fill(~think, 0.0)
        return logits, thought, w, think

    def _sample(self, hidden: torch.Tensor) -> torch.Tensor:
        """The next thought token [B] of the last states [B, d], from the thought's head."""
        return sample(self.head.logits(hidden).float(), self.temperature, self.generator)

    def _think(self, hidden: torch.Tensor, pos: torch.Tensor, end: torch.Tensor):
        """t_1..t_k from START's (or the prefix's last) state ``hidden`` [B, d], then END: (the
        thought [B, k], END's state [B, d]); k + 1 more entries in the cache."""
        decoder, k, m = self.decoder, self.k, self.m
        embed = self.model.embedding.base
        thought = []
        for j in range(1, k + 1):  # hidden is the state of START (or the prefix's last), then of t_{j-1}
            token = self._sample(hidden)
            thought.append(token)
            if j < k:
                hidden = decoder(embed(token[:, None]), pos[:, m + j + 1:m + j + 2])[:, -1]
        # t_k's own output is not needed (END comes next in any case): one call for both.
        hidden = decoder(torch.cat([embed(token[:, None]), end], 1), pos[:, m + k + 1:])
        return torch.stack(thought, 1), hidden[:, -1]

    def _think_until_stop(self, hidden: torch.Tensor, pos: torch.Tensor):
        """``_think`` where a thought ends at its first stop id, as training's
        (``Rollout.fed_tokens``, the one rule): a row that samples a stop at t_j is fed END in
        t_j's place (position p + m + j + 1, right after its c = j - 1 tokens), and END's output
        is its state; rows that ended are fed the pad id until every row has (those entries are
        dropped unread). Returns (the thought [B, k]: its own ids, the stop that ended it kept and
        the pad id after it, as training's, ``Rollout.thought_mask``; END's state [B, d])."""
        decoder, k, m, rollout = self.decoder, self.k, self.m, self.rollout
        embed = self.model.embedding  # END among the ids fed
        B = hidden.shape[0]
        tokens, h_thought = [], torch.zeros_like(hidden)
        for j in range(1, k + 1):
            token = self._sample(hidden)
            tokens.append(token)
            c = rollout.fed_tokens(torch.stack(tokens, 1))        # [B] in 0..j: j while a thought goes on
            going, ends = c == j, c == j - 1                      # ends: a stop at t_j
            # pass m + j + 1: t_j while the thought goes on, END in a stop's place, else the pad id
            ids = torch.where(going, token, torch.where(ends, rollout.end_id, rollout.pad_id))[:, None]
            if j == k:  # t_k with END, as in _think: one call for both
                ids = torch.cat([ids, torch.where(going, rollout.end_id, rollout.pad_id)[:, None]], 1)
            out = decoder(embed(ids), pos[:, m + j + 1:m + j + 1 + ids.shape[1]])   # [B, 1 or 2, d]
            h_thought = torch.where(ends[:, None], out[:, 0], h_thought)
            if j == k:
                h_thought = torch.where(going[:, None], out[:, 1], h_thought)
            elif not going.any():  # every row's thought has ended: no more calls
                break
            hidden = out[:, 0]
        thought = torch.stack(tokens, 1)
        thought = torch.cat([thought, thought.new_full((B, k - thought.shape[1]), rollout.pad_id)], 1)
        own = rollout.thought_mask(thought, rollout.fed_tokens(thought))
        return thought.masked_fill(~own, rollout.pad_id), h_thought
