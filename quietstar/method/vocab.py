"""The LM head's vocabulary-sized work, a chunk of rows at a time.

Every log-probability the method needs (base and mixed NLL, the REINFORCE log-probabilities of
the sampled thought tokens, the unmixed post-thought NLL of ``thought_loss_weight`` /
``reward_source="thought"``), the thought sampling and the base prediction's entropy that
chooses where to think (``thought_selection="entropy"``) go through ``VocabHead``. Its logits
z = softcap(h @ W^T + b), the meta tokens at -inf, exist for ``chunk_rows`` rows at a time; the
backward recomputes a chunk's logits from the hidden states it saved (the fused linear
cross-entropy idea), so the vocabulary costs O(chunk x V) memory at any length. The mixed
prediction mixes hidden states (``mixing.MixingHead``), so its log-probabilities are those of
the mixed hidden state and gradients reach w, both states and W through it.

``chunk_rows = 0`` computes all rows at once and keeps their logits for the backward (no
recompute: faster, [tokens x V] memory).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from quietstar.method.sampling import inverse_cdf

ENTROPY_CHUNK_ROWS = 1024  # the entropy's rows at a time with chunk_rows = 0 (nothing to keep)


@dataclass(frozen=True, eq=False)  # holds tensors: no field-wise ==
class VocabHead:
    """The LM head as the loss and the sampler see it (see the module docstring)."""

    weight: torch.Tensor         # [V, d]
    bias: torch.Tensor | None    # [V]
    softcap: float | None        # final_logit_softcapping (Gemma-2): z = cap * tanh(z / cap)
    masked_ids: torch.Tensor     # ids never predicted (the meta tokens inside the vocabulary)
    chunk_rows: int
    # The head module, where its weight exists only inside its own forward (DeepSpeed ZeRO-3
    # partitions it): then each chunk calls it under torch.utils.checkpoint instead (slower:
    # autograd's log-softmax, the sampling logits computed once more with gradients).
    module: torch.nn.Module | None = None

    def unmasked(self) -> "VocabHead":
        """This head with no id masked: every row of the LM head in the softmax, the meta tokens'
        included (``QuietStarConfig.meta_tokens_in_loss``)."""
        return replace(self, masked_ids=self.masked_ids[:0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """All logits [..., V] of ``hidden`` [..., d], with gradients (the public scoring APIs)."""
        z = self.module(hidden) if self.module is not None else F.linear(hidden, self.weight, self.bias)
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.masked_ids.numel():
            z = z.index_fill(-1, self.masked_ids, float("-inf"))
        return z

    def logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log softmax(z / temperature)[target] in float32 (at least), for hidden [..., d] and
        targets [...]."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        if self.module is not None:
            return self._checkpointed_logprobs(flat, targets.reshape(-1), temperature).view(targets.shape)
        out, _ = _HeadLogprob.apply(flat, self.weight, self.bias, targets.reshape(-1), self, temperature, None)
        return out.view(targets.shape)

    def sample(self, hidden: torch.Tensor, temperature: float, generator: torch.Generator | None = None,
               logprob_temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids [...] sampled from softmax(z / temperature) for hidden [..., d] (greedy at
        temperature 0), as ``sampling.sample`` on the full logits with the same generator; with
        ``logprob_temperature``, also their log softmax(z / logprob_temperature) [...] with
        gradients (REINFORCE), from the same chunk's logits."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        uniforms = None
        if temperature != 0:  # one number per row, drawn at once as sampling.sample does
            uniforms = torch.rand(flat.shape[0], 1, generator=generator, device=flat.device)
        draw = (temperature, uniforms)
        if self.module is not None:
            with torch.no_grad():
                tokens = torch.cat([_draw(self.logits(flat[rows]), temperature, uniforms, rows)
                                    for rows in self.chunks(flat.shape[0])])
            logp = None if logprob_temperature is None else self.logprobs(flat, tokens, logprob_temperature)
            return tokens.view(hidden.shape[:-1]), None if logp is None else logp.view(hidden.shape[:-1])
        if logprob_temperature is None:
            with torch.no_grad():
                _, tokens = _HeadLogprob.apply(flat.detach(), self.weight, self.bias, None, self, 1.0, draw)
            return tokens.view(hidden.shape[:-1]), None
        out, tokens = _HeadLogprob.apply(flat, self.weight, self.bias, None, self, logprob_temperature, draw)
        return tokens.view(hidden.shape[:-1]), out.view(hidden.shape[:-1])

    @torch.no_grad()
    def entropy(self, hidden: torch.Tensor) -> torch.Tensor:
        """Entropy (nats) of softmax(z) per row, hidden [..., d] -> [...] in float32 at least, a chunk
        of rows at a time (the meta tokens, at -inf, add nothing); no gradient."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        step = self.chunk_rows if self.chunk_rows > 0 else ENTROPY_CHUNK_ROWS  # never all [N, V] at once
        parts = []
        for i in range(0, flat.shape[0], step):
            h = flat[i:i + step]
            z = self.logits(h).float() if self.module is not None else self.chunk_logits(h, self.weight, self.bias)
            parts.append(torch.special.entr(z.softmax(-1)).sum(-1))
        return torch.cat(parts).view(hidden.shape[:-1]) if parts else flat.new_zeros(hidden.shape[:-1]).float()

    def _checkpointed_logprobs(self, h: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
        """``logprobs`` through the head module, a chunk at a time, recomputed in the backward."""
        def piece(h_part, t_part):
            z = self.logits(h_part)
            z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
            return torch.log_softmax(z, -1).gather(-1, t_part[:, None]).squeeze(-1)

        recompute = torch.is_grad_enabled() and self.chunk_rows > 0
        return torch.cat([checkpoint(piece, h[rows], t[rows], use_reentrant=False) if recompute
                          else piece(h[rows], t[rows]) for rows in self.chunks(h.shape[0])])

    def chunks(self, rows: int) -> list[slice]:
        step = self.chunk_rows if self.chunk_rows > 0 else max(rows, 1)
        return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]

    def chunk_logits(self, h: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        """Logits [c, V] of rows ``h`` [c, d] in float32 (at least), softcapped and masked."""
        z = F.linear(h, weight, bias)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        if self.softcap is not None:
            z = torch.tanh(z.div_(self.softcap)).mul_(self.softcap)
        if self.masked_ids.numel():
            z.index_fill_(-1, self.masked_ids, float("-inf"))
        return z


def _draw(z: torch.Tensor, temperature: float, uniforms: torch.Tensor | None, rows: slice) -> torch.Tensor:
    """Token ids [c] of a chunk's logits z [c, V]: greedy at temperature 0, else inverse CDF at
    the chunk's own uniform numbers."""
    if temperature == 0:
        return z.argmax(-1)
    return inverse_cdf(z.float() / temperature if temperature != 1 else z.float(), uniforms[rows])


class _HeadLogprob(torch.autograd.Function):
    """(log softmax(z / T)[t], t) per row of hidden [N, d], z = the head's logits, a chunk of
    rows at a time. t is ``targets`` [N], or with ``draw`` = (sampling temperature, uniforms
    [N, 1] or None for greedy) sampled from that chunk's z (no gradient through the choice)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, bias, targets, head: VocabHead, temperature, draw):
        N = hidden.shape[0]
        out = torch.empty(N, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        lse = torch.empty_like(out)
        tokens = torch.empty(N, dtype=torch.long, device=hidden.device) if draw is not None else targets
        needs_grad = any(ctx.needs_input_grad[:3])  # (under no_grad too: then ctx dies at once)
        kept = [] if needs_grad and head.chunk_rows == 0 else None  # unchunked: no recompute
        for rows in head.chunks(N):
            z = head.chunk_logits(hidden[rows], weight, bias)                # [c, V]
            if draw is not None:
                tokens[rows] = _draw(z, *draw, rows)
            if temperature != 1:
                z = z.div_(temperature)
            picked = z.gather(-1, tokens[rows, None]).squeeze(-1)
            if kept is not None:
                lse[rows] = torch.logsumexp(z, -1)
                kept.append(z)
            else:  # log-sum-exp in place: one [c, V] tensor alive, not two
                top = z.amax(-1, keepdim=True)
                lse[rows] = z.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))
            out[rows] = picked - lse[rows]
        ctx.mark_non_differentiable(tokens)
        if needs_grad:
            ctx.save_for_backward(hidden, weight, bias, tokens, lse)
            ctx.head, ctx.temperature, ctx.kept = head, temperature, kept
        return out, tokens

    @staticmethod
    @torch.autograd.function.once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")  # the forward's autocast state, for the recompute
    def backward(ctx, grad, _):
        hidden, weight, bias, tokens, lse = ctx.saved_tensors
        head, T = ctx.head, ctx.temperature
        if head.chunk_rows == 0 and ctx.kept is None:
            raise RuntimeError("the vocabulary log-probabilities' backward ran twice; with "
                               "loss_chunk_tokens=0 it cannot be retained (retain_graph=True): it "
                               "turns the kept logits into the gradient in place")
        kept, ctx.kept = ctx.kept, None
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if want_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # summed over chunks: float32 at least
        grad_w = torch.zeros_like(weight, dtype=acc) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if want_b else None
        g = grad / T
        for i, rows in enumerate(head.chunks(hidden.shape[0])):
            if kept is not None:
                z = kept[i]                                                  # z / T, kept
                kept[i] = None
            else:
                z = head.chunk_logits(hidden[rows], weight, bias)
                if T != 1:
                    z = z.div_(T)
            # through cap * tanh(raw / cap): times 1 - tanh^2, tanh = z T / cap
            capped = 1 - (z * (T / head.softcap)) ** 2 if head.softcap is not None else None
            # d/dz [log_softmax(z / T)_t] = (onehot_t - softmax(z / T)) / T, built in place
            gz = z.sub_(lse[rows, None]).exp_().mul_(-g[rows, None])
            gz.scatter_add_(-1, tokens[rows, None], g[rows, None])
            if capped is not None:
                gz.mul_(capped)
            if head.masked_ids.numel():  # -inf logits: no gradient (and no 0 * inf)
                gz.index_fill_(-1, head.masked_ids, 0.0)
            h = hidden[rows]
            gz = gz.to(h.dtype)
            if want_h:
                grad_h[rows] = gz @ weight.to(h.dtype)
            if want_w:
                if gz.dtype == grad_w.dtype and not torch.is_autocast_enabled(h.device.type):
                    grad_w.addmm_(gz.t(), h)  # no [V, d] temporary per chunk
                else:
                    grad_w += gz.t() @ h
            if want_b:
                grad_b += gz.sum(0)
        grad_w = grad_w.to(weight.dtype) if want_w else None
        grad_b = grad_b.to(bias.dtype) if want_b else None
        return grad_h, grad_w, grad_b, None, None, None, None
