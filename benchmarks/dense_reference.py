"""Quiet-STaR computed the way the paper's code does it: pass by pass, with dense masks.

This is the straightforward implementation that ``quietstar`` is checked and timed against. Pass
p (p = 0 .. F-1, see ``quietstar.method.rollout``) feeds the L tokens of that pass as queries to an
ordinary SDPA (or eager) attention over the keys of *every* pass so far, concatenated in a cache
that keeps its gradients, under a dense additive mask of shape [B, 1, L, (p+1)*L]:

    text keys      causal and not padding (the query at position i sees text keys 0..i)
    pass-q keys    only the diagonal (the query at position i sees its own thought's key i)

Thought tokens are sampled inside the same passes (the choice carries no gradient), so a training
step is F forward passes with gradients and one backward through all of them. Its masks (one
value per query-key pair of every pass: about B (F L)^2 / 2 in all) and the keys of all earlier
passes that every pass concatenates and keeps for the backward (about F^2 L / 2 key vectors per
layer, which transformers' SDPA path also copies to every head under grouped-query attention)
make its memory grow like (F L)^2 and its attention work like F^2 L^2: what quietstar's split
attention avoids.

The model is a deep copy of a ``QuietStarForCausalLM`` with its LM switched to a stock attention
implementation, so none of quietstar's attention code runs here. Only the model's public parts
are used (its embedding, decoder, LM head, mixing head and sampler); the targets, the mixing and
the objective are written out here again, plainly, so that a mistake in quietstar's own does
not repeat itself in the reference it is checked against.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import DynamicCache

from quietstar.models.modeling import QuietStarForCausalLM, ThoughtScores
from quietstar.method.rollout import GridHidden, text_positions
from quietstar.method.sampling import sample


class DenseQuietStar(nn.Module):
    """A copy of ``model`` whose thought rollout uses dense masks and stock attention.

    It has its own weights (a deep copy), so it can be trained and timed independently; right after
    construction it computes the same function as ``model``.
    """

    def __init__(self, model: QuietStarForCausalLM, attn_implementation: str = "sdpa"):
        super().__init__()
        text_config = model.lm.config.get_text_config()
        if getattr(text_config, "attn_logit_softcapping", None) or getattr(text_config, "sinks", None):
            raise NotImplementedError("the dense reference supports models without attention "
                                      "softcapping or sinks")
        layer_types = set(getattr(text_config, "layer_types", None) or [])
        if len(layer_types) > 1:
            raise NotImplementedError(f"the dense reference needs one attention type for all layers, "
                                      f"got {sorted(layer_types)}")
        self.model = copy.deepcopy(model)
        self.model.lm.set_attn_implementation(attn_implementation)
        # All layers slide (e.g. Mistral) or none does; None means no window.
        self.sliding_window = getattr(text_config, "sliding_window", None)
        if layer_types == {"full_attention"}:
            self.sliding_window = None

    @property
    def config(self):
        return self.model.config

    def _mask(self, positions: torch.Tensor, valid: torch.Tensor, p: int, dtype) -> torch.Tensor:
        """Additive mask [B, 1, L, (p+1)*L] for the queries of pass p (position ids pos_i + p)."""
        B, L = positions.shape
        idx = torch.arange(L, device=positions.device)
        text = (idx[None, :] <= idx[:, None])[None] & valid[:, None, :]      # [B, L, L]
        text = text | torch.eye(L, dtype=torch.bool, device=text.device)  # padded rows see themselves
        own = torch.eye(L, dtype=torch.bool, device=text.device).expand(B, L, L)
        if self.sliding_window is not None:
            text = text & ((positions[:, :, None] + p) - positions[:, None, :] < self.sliding_window)
            own_passes = [own & (p - q < self.sliding_window) for q in range(1, p + 1)]
        else:
            own_passes = [own] * p
        allowed = torch.cat([text, *own_passes], dim=-1)[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, float("-inf"))

    def rollout(self, input_ids, attention_mask, thought_ids=None, generator=None):
        """Runs the F passes. Returns (GridHidden, thought ids [B, L, k]).

        With ``thought_ids`` the thought tokens are teacher-forced; without, they are sampled from
        each pass's logits with the sampler ``quietstar.method.rollout.Rollout.sample`` uses.
        """
        m, cfg = self.model, self.model.config
        k, A = cfg.sampled_thought_tokens, cfg.ahead_tokens
        if thought_ids is not None:
            k = thought_ids.shape[-1]
        B, L = input_ids.shape
        positions = text_positions(attention_mask)
        valid = attention_mask.bool()
        decoder = m.decoder
        dtype = _attention_dtype(decoder)
        cache = DynamicCache()  # every pass's keys, with gradients
        pad_id = m.tokenizer.pad_token_id

        def run(p: int, ids: torch.Tensor) -> torch.Tensor:
            out = decoder(inputs_embeds=m.embedding(ids), position_ids=positions + p,
                          attention_mask=self._mask(positions, valid, p, dtype),
                          cache=cache, use_cache=True)
            return out.last_hidden_state

        base = run(0, input_ids)
        current = torch.full_like(input_ids, m.start_id)
        thought_hidden, tokens = [], []
        for p in range(1, k + 1):
            hidden = run(p, current)
            thought_hidden.append(hidden)
            if thought_ids is not None:
                current = thought_ids[..., p - 1]
            else:
                # The same sampler as quietstar's rollout, on the same [B*L, V] rows.
                logits = m.logits(hidden.detach()).view(B * L, -1)
                current = sample(logits, cfg.thought_temperature, generator).view(B, L)
            tokens.append(current)
        run(k + 1, current)  # last thought token: its output is unused (END is forced)
        after = [run(k + 2, torch.full_like(input_ids, m.end_id))]
        for s in range(1, A):
            forced = torch.cat([input_ids[:, s:], input_ids.new_full((B, min(s, L)), pad_id)], 1)[:, :L]
            after.append(run(k + 2 + s, forced))
        grid = GridHidden(base=base, thought=torch.stack(thought_hidden, 2), after=torch.stack(after, 2))
        return grid, torch.stack(tokens, -1)

    def mix(self, grid: GridHidden) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed hidden states [B, L, A, d] and weights [B, L, A]: at step s the post-thought
        state of position i meets the base state of position i+s (the last one past the end)."""
        B, L, A, _ = grid.after.shape
        partner = torch.tensor([[min(i + s, L - 1) for s in range(A)] for i in range(L)],
                               device=grid.base.device)                                 # [L, A]
        return self.model.mixing_head(grid.base[:, partner], grid.after)

    def score_thoughts(self, input_ids, thought_ids, attention_mask=None) -> ThoughtScores:
        """The same as ``QuietStarForCausalLM.score_thoughts``, computed densely."""
        m = self.model
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        grid, _ = self.rollout(input_ids, attention_mask, thought_ids)
        mixed, w = self.mix(grid)
        return ThoughtScores(m.logits(grid.base), m.logits(grid.after), w, m.logits(mixed))

    def forward(self, input_ids, attention_mask=None, labels=None, generator=None):
        """One training step, as ``QuietStarForCausalLM.forward``: returns (loss, metrics with
        base_nll, mixed_nll_<s>, policy_loss and mean_reward, thought ids [B, n, L, k])."""
        m, cfg = self.model, self.model.config
        n, A = cfg.thoughts_per_position, cfg.ahead_tokens
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, -100)
        B, L = input_ids.shape
        # targets[b, i, s] = label of x_{i+1+s}, -100 past the end of the text; a padding
        # position predicts nothing (with left padding the last one precedes the first real token)
        targets = torch.full((B, L, A), -100, dtype=torch.long, device=input_ids.device)
        for s in range(A):
            targets[:, :L - 1 - s, s] = labels[:, 1 + s:]
        targets[attention_mask == 0] = -100
        input_ids, attention_mask, targets = (t.repeat_interleave(n, 0) for t in (input_ids, attention_mask, targets))
        valid = targets != -100
        targets = targets.clamp(min=0)
        grid, thoughts = self.rollout(input_ids, attention_mask, generator=generator)
        mixed, _ = self.mix(grid)
        head = m.vocab_head()  # the model's log-likelihoods, chunked as its config says
        base_logp = head.logprobs(grid.base, targets[..., 0])                                   # [Bn, L]
        mixed_logp = head.logprobs(mixed, targets)                                              # [Bn, L, A]
        thought_logp = head.logprobs(grid.thought, thoughts, cfg.policy_logprob_temperature)    # [Bn, L, k]
        loss, metrics = _objective(cfg, base_logp, mixed_logp, thought_logp, valid)
        return loss, metrics, thoughts.view(-1, n, *thoughts.shape[1:])


def _objective(cfg, base_logp, mixed_logp, thought_logp, valid):
    """The Quiet-STaR objective written out position by position's sums (see the paper, eq. 5-7)."""
    n, A = cfg.thoughts_per_position, mixed_logp.shape[-1]
    v = valid.float()
    base_nll = -(base_logp * v[..., 0]).sum() / v[..., 0].sum()
    mixed_nll = torch.stack([-(mixed_logp[..., s] * v[..., s]).sum() / v[..., s].sum() for s in range(A)])
    # reward of a thought: sum over the A true tokens of log p_mix, against the mean of the n
    # thoughts at the same position or against the base model's own log-likelihood of them
    thought_ll = (mixed_logp.detach() * v).sum(-1)                              # [Bn, L]
    base_of_target = torch.zeros_like(mixed_logp)
    for s in range(A):
        base_of_target[:, :base_logp.shape[1] - s, s] = base_logp.detach()[:, s:]
    base_ll = (base_of_target * v).sum(-1)
    if cfg.reward_baseline == "thought_mean":
        per_text = thought_ll.view(-1, n, thought_ll.shape[1])
        reward = (per_text - per_text.mean(1, keepdim=True)).view_as(thought_ll)
    else:
        reward = thought_ll - base_ll
    if cfg.drop_negative_rewards:
        reward = reward.clamp(min=0)
    w0 = v[..., 0]
    policy_loss = -(reward * thought_logp.mean(-1) * w0).sum() / w0.sum()
    loss = (cfg.base_loss_weight * base_nll + cfg.mixed_loss_weight * mixed_nll.mean()
            + cfg.policy_loss_weight * policy_loss)
    metrics = {"base_nll": base_nll, "policy_loss": policy_loss,
               "mean_reward": (reward * w0).sum() / w0.sum(),
               **{f"mixed_nll_{s + 1}": mixed_nll[s] for s in range(A)}}
    return loss, {k: t.detach() for k, t in metrics.items()}


def _attention_dtype(decoder) -> torch.dtype:
    """The dtype queries have inside attention: SDPA wants a float mask of that dtype."""
    weight = next(decoder.parameters())
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype
