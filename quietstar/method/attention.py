"""The thought attention pattern, injected through transformers' AttentionInterface.

A thought-mode forward lays its tokens out *pass by pass*: the L text tokens first, then one
block of L tokens per thought pass (START, thought tokens, END, teacher-forced tokens). The token
of position i in pass p may see

    text keys 0..i                          (the ordinary causal part, an L x L block)
    its own keys of passes 1..p             (the "diagonal" part, L x p values)

and nothing else: never another position's thought. We score the two parts separately and
normalise them with one joint softmax, so attention costs O(L^2 + L*P) per pass and no
L x (L*P) mask or per-position copy of the text keys is ever built.

A rollout may run its passes in one call (the whole grid) or over several calls (one pass per
sampled thought token): the layout's ``key_store`` then keeps each layer's keys/values of the
earlier calls, one block per pass, and nothing is ever concatenated.

With position selection (``ThoughtLayout.rows``) the thought passes have one query row per
*selected* position only: S rows per sequence, each attending to the text keys 0..i of its own
position (computed once, by the text pass) and to its own thought's keys.

Ordinary calls (no ``thought_layout`` keyword) fall through to standard SDPA attention with the
usual masks, so the wrapped model still behaves as the plain base model outside thought mode.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from quietstar.method.thought_layout import PassKeys, ThoughtLayout

ATTENTION_NAME = "quietstar"

# Keyword arguments that models hand to attention functions which we either honour or that carry
# no meaning for the result; anything else that is not None is refused (e.g. attention sinks).
_HANDLED_KWARGS = {
    "sliding_window", "softcap", "thought_layout", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
    "max_length_q", "max_length_k", "output_attentions", "use_cache", "cache_position", "is_causal",
    "return_dict", "output_hidden_states", "layer_idx", "head_mask", "position_bias",
}


def thought_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered under ``ATTENTION_NAME``; see the module docstring."""
    layout: ThoughtLayout | None = kwargs.get("thought_layout")
    softcap = kwargs.get("softcap")
    sliding_window = kwargs.get("sliding_window")
    unknown = [k for k, v in kwargs.items() if k not in _HANDLED_KWARGS and v is not None]
    if unknown or getattr(module, "sinks", None) is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError(
            f"{type(module).__name__} passes attention arguments quietstar does not support "
            f"({unknown or ['sinks/position_bias']}); this model family cannot be wrapped yet")
    if layout is None:
        return _plain_attention(module, query, key, value, attention_mask, scaling, dropout,
                                softcap=softcap, sliding_window=sliding_window)

    if query.dtype != value.dtype or key.dtype != value.dtype:
        # Under autocast RoPE leaves q/k in float32 while v comes out of its projection in bf16.
        query, key = query.to(value.dtype), key.to(value.dtype)
    if query.shape[2] != key.shape[2]:
        raise RuntimeError(f"thought layout mismatch: {query.shape[2]} queries and {key.shape[2]} "
                           "keys; a thought-mode call brings the keys of its own queries")
    if layout.rows is not None and layout.query_passes[0] == 0 and len(layout.query_passes) > 1:
        # The text pass (L rows) and selected rows' passes (S each) in one call: the text first,
        # then the rest, which reads the text's keys from the store (a temporary one if need be).
        L = layout.text_len
        store = {} if layout.key_store is None else layout.key_store
        text = replace(layout, query_passes=(0,), key_store=store)
        rest = replace(layout, query_passes=layout.query_passes[1:], key_store=store)
        parts = [_thought_call(module, query[:, :, s], key[:, :, s], value[:, :, s], part, scaling,
                               dropout, softcap, sliding_window)
                 for s, part in ((slice(0, L), text), (slice(L, None), rest))]
        return torch.cat(parts, 1), None
    return _thought_call(module, query, key, value, layout, scaling, dropout, softcap, sliding_window), None


def _thought_call(module, query, key, value, layout: ThoughtLayout, scaling, dropout, softcap,
                  sliding_window) -> torch.Tensor:
    """One homogeneous thought-mode call (every pass block of one width): [B, Q, H, D]."""
    keys = layout.pass_keys(module, key, value)
    scale = scaling if scaling is not None else query.shape[3] ** -0.5
    window_binds = sliding_window is not None and sliding_window <= layout.text_len + max(layout.query_passes)
    if (query.device.type == "cpu" and softcap is None and dropout == 0 and not window_binds
            and query.dtype in (torch.float32, torch.float64, torch.bfloat16)):
        P = len(keys.own_keys)
        if (layout.flash_own and layout.query_rows is not None and P > 1
                and layout.query_passes == tuple(range(1, P + 1))):
            return _whole_thought_attention(query, key, value, keys, layout, scale)
        return _fused_thought_attention(query, keys, layout, scale)[0]
    if query.device.type != "cpu" and softcap is None and dropout == 0 and not window_binds:
        return _sdpa_thought_attention(query, keys, layout, scale)[0]
    return _general_thought_attention(query, keys, layout, scale, softcap, sliding_window, dropout)[0]


# The own-thought part: per query, P dot products and a P-term value sum, done as batched
# small per-(batch, kv head, position) matrix products on PassKeys' buffers. The buffers sit
# outside autograd, so _OwnProduct takes the pass blocks too, only to return their gradients,
# and keeps the buffer on ctx rather than saving it: later calls write other (never these) slots.
def _no_autocast(fn):
    """Runs ``fn`` with autocast off: these products run in their inputs' dtype (float32 at
    least, chosen by the caller), and forward and backward must agree on it."""
    def wrapper(ctx, x, *args):
        with torch.autocast(x.device.type, enabled=False):
            return fn(ctx, x, *args)
    return wrapper


def _to_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, G, Qp, L, X] -> [B, Hkv, L, G*Qp, X]: one small matrix per (batch, head, position)."""
    B, Hkv, G, Qp, L, X = x.shape
    return x.permute(0, 1, 4, 2, 3, 5).reshape(B, Hkv, L, G * Qp, X)


def _from_rows(x: torch.Tensor, G: int, Qp: int) -> torch.Tensor:
    B, Hkv, L, _, X = x.shape
    return x.view(B, Hkv, L, G, Qp, X).permute(0, 1, 3, 4, 2, 5)


class _OwnProduct(torch.autograd.Function):
    """Per (batch, kv head, position), rows x [B, Hkv, G, Qp, L, X] times that position's P
    blocks, held in a buffer [B, Hkv, L, P, D]:

        scores  x = queries (X = D):       scale * x @ blocks^T  -> [B, Hkv, G, Qp, L, P]
        values  x = probabilities (X = P): x @ blocks            -> [B, Hkv, G, Qp, L, D]
    """

    @staticmethod
    @_no_autocast
    def forward(ctx, x6, scores: bool, scale: float, buffer, *blocks):
        ctx.save_for_backward(x6)
        ctx.scores, ctx.scale, ctx.buffer, ctx.block_dtype = scores, scale, buffer, blocks[0].dtype
        right = buffer.to(x6.dtype)
        out = _small_matmul(_to_rows(x6), right.transpose(-1, -2) if scores else right)
        return _from_rows(out.mul_(scale) if scale != 1.0 else out, *x6.shape[2:4])

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_no_autocast
    def backward(ctx, grad):
        (x6,) = ctx.saved_tensors
        right = ctx.buffer.to(x6.dtype)
        grad = grad.to(x6.dtype)
        grad = _to_rows(grad * ctx.scale if ctx.scale != 1.0 else grad)
        rows = _to_rows(x6)
        dx = _small_matmul(grad, right if ctx.scores else right.transpose(-1, -2))
        # The blocks' gradient, [.., P, D] either way.
        d_blocks = _small_matmul(grad.transpose(-1, -2), rows) if ctx.scores else _small_matmul(
            rows.transpose(-1, -2), grad)
        return (_from_rows(dx, *x6.shape[2:4]), None, None, None,
                *d_blocks.to(ctx.block_dtype).unbind(3))


def _own_scores(q6: torch.Tensor, keys: PassKeys, scale: float, dtype: torch.dtype):
    """Scores of queries q6 [B, Hkv, G, Qp, L, D] against their own position's key of every
    thought pass so far: [B, Hkv, G, Qp, L, P], unmasked, in ``dtype``."""
    return _OwnProduct.apply(q6.to(dtype), True, scale, keys.own_buffers()[0], *keys.own_keys)


def _own_values(probs: torch.Tensor, keys: PassKeys) -> torch.Tensor:
    """sum over passes p of probs[..., p] * value_p: [B, Hkv, G, Qp, L, D] in probs' dtype."""
    return _OwnProduct.apply(probs, False, 1.0, keys.own_buffers()[1], *keys.own_values)


def _general_thought_attention(query, keys: PassKeys, layout: ThoughtLayout, scale: float,
                               softcap=None, sliding_window=None, dropout: float = 0.0):
    """The pattern in plain tensor ops: any device and dtype, softcapping, binding windows, dropout."""
    B, H, Q, D = query.shape
    text_k, text_v = keys.text_key, keys.text_value
    Hkv = text_k.shape[1]
    G = H // Hkv
    L, Lq = layout.text_len, layout.query_width
    Qp = len(layout.query_passes)
    P = len(keys.own_keys)
    # Group query heads by their key/value head (GQA) instead of copying keys to every head.
    q = query.view(B, Hkv, G, Qp, Lq, D)
    s_text = torch.matmul(q.reshape(B, Hkv, G * Qp * Lq, D), text_k.transpose(-1, -2))
    s_text = s_text.view(B, Hkv, G, Qp, Lq, L) * scale
    if softcap is not None:
        s_text = torch.tanh(s_text / softcap) * softcap
    s_text = s_text.masked_fill(~layout.text_mask(sliding_window), float("-inf"))
    row_max = s_text.amax(-1)

    if P > 0:
        s_own = _own_scores(q, keys, scale, query.dtype)
        if softcap is not None:
            s_own = torch.tanh(s_own / softcap) * softcap
        s_own = s_own.masked_fill(~layout.thought_mask(P, sliding_window), float("-inf"))
        row_max = torch.maximum(row_max, s_own.amax(-1))

    # One softmax over both parts: shared max, shared normaliser.
    row_max = row_max.detach().unsqueeze(-1)
    e_text = torch.exp(s_text - row_max)
    norm = e_text.sum(-1, keepdim=True)
    if P > 0:
        e_own = torch.exp(s_own - row_max)
        norm = norm + e_own.sum(-1, keepdim=True)
    p_text = e_text / norm
    if dropout > 0:
        p_text = F.dropout(p_text, p=dropout, training=True)
    out = torch.matmul(p_text.view(B, Hkv, G * Qp * Lq, L), text_v).view(B, Hkv, G, Qp, Lq, D)
    if P > 0:
        p_own = e_own / norm
        if dropout > 0:
            p_own = F.dropout(p_own, p=dropout, training=True)
        out = out + _own_values(p_own, keys)
    # (B, Hkv, G, Qp, L, D) -> (B, Qp*L, H, D), the layout models expect back.
    out = out.reshape(B, H, Q, D).transpose(1, 2).contiguous()
    return out, None


def _masked_own_scores(q6, keys: PassKeys, layout: ThoughtLayout, scale: float):
    """Own-thought scores [B, Hkv, G, Qp, L, P] in float32 at least (the part is small: L x P).
    Masked entries get the dtype's minimum, not -inf, so rows with no own key (text queries) keep
    a finite, differentiable log-sum-exp."""
    s_own = _own_scores(q6, keys, scale, torch.promote_types(q6.dtype, torch.float32))
    P = len(keys.own_keys)
    if layout.query_passes[0] >= P:  # every query sees all P own keys (one pass per call)
        return s_own
    return s_own.masked_fill(~layout.thought_mask(P, None), torch.finfo(s_own.dtype).min)


def _small_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., M, C] @ b [..., C, N] for the own part's tiny per-position matrices.

    Batched products of matrices below ~512 multiply-adds run a slow per-matrix loop on CPU (up
    to 5x slower than the arithmetic needs), so there a short contraction (C < 8: the own keys of
    an early pass, the few query rows of a kv head) is unrolled into C broadcast multiply-adds.
    """
    C = a.shape[-1]
    if C >= 8 or a.shape[-2] * b.shape[-1] * C >= 512 or a.device.type != "cpu":
        return torch.matmul(a, b)
    out = a[..., :, :1] * b[..., :1, :]
    for c in range(1, C):
        out.addcmul_(a[..., :, c:c + 1], b[..., c:c + 1, :])
    return out


class _FusedThoughtAttention(torch.autograd.Function):
    """The whole thought attention of one call on CPU, as one autograd node: the text part by the
    fused (flash) kernel, the own-thought part by batched per-position products, merged through
    the log-sum-exps. One node instead of a chain of small ones matters: at short lengths the
    per-operation overhead, not the arithmetic, is what thinking adds to a pass.

    Backward: the merged output is a softmax over {text part, own keys}. For the text keys the
    flash backward gives the right gradient when fed the text share a times dO as the output
    gradient and the MERGED output as "its" output: its row term rowsum(dO_text * out) is then
    a * (dO . out), exactly the joint softmax's. The own part is the plain softmax backward:
    ds_p = pi_p * (dO . v_p - dO . out).

    Shapes: queries [B, Hkv*G*Qp, L, D] (heads ordered kv head, group, pass, as the kernel's
    GQA reads them); the own part works on rows [B, Hkv, L, R = G*Qp, X], one small matrix per
    (batch, kv head, position). ``own_mask`` [R, P] (None: every row sees all P own keys). Here L
    counts query rows: with selected rows it is S, and the text keys (any length) come with a mask.
    """

    @staticmethod
    def forward(ctx, q, text_k, text_v, text_mask, own_mask, scale, chunks, passes, keys: PassKeys, *blocks):
        with torch.autocast(q.device.type, enabled=False):
            B, HQ, L, D = q.shape
            Hkv = text_k.shape[1]
            R = HQ // Hkv
            work = torch.promote_types(q.dtype, torch.float32)  # the merge is float32 at least
            out_text, lse_text = _text_flash(q, text_k, text_v, text_mask, scale, chunks, passes)
            key_buf, value_buf = (b.to(work) for b in keys.own_buffers())
            rows = q.view(B, Hkv, R, L, D).transpose(2, 3).to(work)  # [B, Hkv, L, R, D]
            s_own = _small_matmul(rows, key_buf.transpose(-1, -2)).mul_(scale)  # [B, Hkv, L, R, P]
            if own_mask is not None:
                s_own.masked_fill_(~own_mask, torch.finfo(work).min)
            # One softmax over the text part (its log-sum-exp) and the own keys.
            lse_text_rows = lse_text.view(B, Hkv, R, L).transpose(2, 3).to(work)  # [B, Hkv, L, R]
            row_max = torch.maximum(s_own.amax(-1), lse_text_rows)
            probs = s_own.sub_(row_max.unsqueeze(-1)).exp_()                   # [B, Hkv, L, R, P]
            text_share = (lse_text_rows - row_max).exp_()                      # [B, Hkv, L, R]
            norm = probs.sum(-1).add_(text_share)
            probs.div_(norm.unsqueeze(-1))
            text_share.div_(norm)
            own_out = _small_matmul(probs, value_buf)                          # [B, Hkv, L, R, D]
            out = torch.addcmul(own_out.transpose(2, 3), text_share.transpose(2, 3).unsqueeze(-1),
                                out_text.view(B, Hkv, R, L, D)).to(q.dtype).reshape(B, HQ, L, D).contiguous()
        ctx.save_for_backward(q, text_k, text_v, text_mask, lse_text, out, text_share, probs)
        ctx.scale, ctx.buffers, ctx.chunks = scale, (key_buf, value_buf), chunks
        ctx.block_dtype = keys.own_keys[0].dtype
        ctx.passes = passes
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, text_k, text_v, text_mask, lse_text, out, text_share, probs = ctx.saved_tensors
        key_buf, value_buf = ctx.buffers
        scale = ctx.scale
        with torch.autocast(q.device.type, enabled=False):
            B, HQ, L, D = q.shape
            Hkv = text_k.shape[1]
            R = HQ // Hkv
            work = probs.dtype
            g = grad_out.reshape(B, Hkv, R, L, D)
            share = text_share.transpose(2, 3).unsqueeze(-1)  # [B, Hkv, R, L, 1]
            grad_text = (share * g).to(q.dtype).reshape(B, HQ, L, D).contiguous()
            dq, dk, dv = _text_flash_backward(grad_text, q, text_k, text_v, out, lse_text, text_mask, scale,
                                              ctx.chunks, ctx.passes)
            g_rows = g.transpose(2, 3).to(work)                                      # [B, Hkv, L, R, D]
            row_dot = (g_rows * out.view(B, Hkv, R, L, D).transpose(2, 3)).sum(-1, keepdim=True)
            d_scores = probs * (_small_matmul(g_rows, value_buf.transpose(-1, -2)) - row_dot)
            d_rows = _small_matmul(d_scores, key_buf).mul_(scale)                    # [B, Hkv, L, R, D]
            dq = (dq.view(B, Hkv, R, L, D) + d_rows.transpose(2, 3)).to(q.dtype).reshape(B, HQ, L, D)
            rows = q.view(B, Hkv, R, L, D).transpose(2, 3).to(work)
            d_keys = _small_matmul(d_scores.transpose(-1, -2), rows).mul_(scale)     # [B, Hkv, L, P, D]
            d_values = _small_matmul(probs.transpose(-1, -2), g_rows)
        dtype = ctx.block_dtype
        return (dq, dk, dv, None, None, None, None, None, None,
                *d_keys.to(dtype).unbind(3), *d_values.to(dtype).unbind(3))


def _fold_passes(x: torch.Tensor, passes: int) -> torch.Tensor:
    """[B, H*Qp, Lq, ...] (heads ordered head, pass) -> [B, H, Lq*Qp, ...] (row r's passes adjacent)."""
    B, HQ, Lq, *rest = x.shape
    return x.view(B, HQ // passes, passes, Lq, *rest).transpose(2, 3).reshape(B, HQ // passes, Lq * passes, *rest)


def _unfold_passes(x: torch.Tensor, passes: int) -> torch.Tensor:
    """The inverse of ``_fold_passes``."""
    B, H, LQ, *rest = x.shape
    return x.view(B, H, LQ // passes, passes, *rest).transpose(2, 3).reshape(B, H * passes, LQ // passes, *rest)


def _folded(chunks, passes: int):
    """``row_chunks`` of rows whose ``passes`` passes are adjacent query rows."""
    return tuple((r0 * passes, r1 * passes, end) for r0, r1, end in chunks)


def _text_flash(q, k, v, mask, scale, chunks, passes: int = 1):
    """The text part by the CPU flash kernel: (out, log-sum-exp); causal without a mask, else
    masked, one call per block of rows over the keys it needs (``ThoughtLayout.row_chunks``).
    Selected rows with ``passes`` > 1 (a whole thought scored in one call): every pass of a row
    sees the same text keys, so the passes join the query rows ([B, H, S*Qp, D] instead of one
    head per pass with S rows each): the kernel then multiplies blocks of rows, not a few rows
    at a time."""
    if passes > 1 and chunks is not None:
        out, lse = _text_flash(_fold_passes(q, passes), k, v, mask.repeat_interleave(passes, 2), scale,
                               _folded(chunks, passes))
        return _unfold_passes(out, passes), _unfold_passes(lse, passes)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if chunks is None:
        return flash(q, k, v, 0.0, mask is None, attn_mask=mask, scale=scale)
    parts = [flash(q[:, :, r0:r1].contiguous(), k[:, :, :end], v[:, :, :end], 0.0, False,
                   attn_mask=mask[:, :, r0:r1, :end].contiguous(), scale=scale) for r0, r1, end in chunks]
    return torch.cat([o for o, _ in parts], 2), torch.cat([lse for _, lse in parts], 2)


def _text_flash_backward(grad, q, k, v, out, lse, mask, scale, chunks, passes: int = 1):
    """(dq, dk, dv) of ``_text_flash``, block by block as its forward."""
    if passes > 1 and chunks is not None:
        dq, dk, dv = _text_flash_backward(
            _fold_passes(grad, passes), _fold_passes(q, passes), k, v, _fold_passes(out, passes),
            _fold_passes(lse, passes), mask.repeat_interleave(passes, 2), scale, _folded(chunks, passes))
        return _unfold_passes(dq, passes), dk, dv
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if chunks is None:
        return backward(grad, q, k, v, out, lse, 0.0, mask is None, attn_mask=mask, scale=scale)
    dq, dk, dv = [], torch.zeros_like(k), torch.zeros_like(v)
    for r0, r1, end in chunks:
        rows = slice(r0, r1)
        dq_part, dk_part, dv_part = backward(
            grad[:, :, rows].contiguous(), q[:, :, rows].contiguous(), k[:, :, :end], v[:, :, :end],
            out[:, :, rows].contiguous(), lse[:, :, rows].contiguous(), 0.0, False,
            attn_mask=mask[:, :, rows, :end].contiguous(), scale=scale)
        dq.append(dq_part)
        dk[:, :, :end] += dk_part
        dv[:, :, :end] += dv_part
    return torch.cat(dq, 2), dk, dv


def _fused_thought_attention(query, keys: PassKeys, layout: ThoughtLayout, scale: float):
    """The same pattern as the general path in one autograd node (``_FusedThoughtAttention``)."""
    B, H, Q, D = query.shape
    Hkv = keys.text_key.shape[1]
    G = H // Hkv
    Lq = layout.query_width
    Qp = len(layout.query_passes)
    # Heads ordered (kv head, group, pass): head h reads kv head h // (G * Qp), as the kernel's GQA.
    q = query.reshape(B, H, Qp, Lq, D).reshape(B, H * Qp, Lq, D)
    mask = layout.additive_text_mask(query.dtype) if layout.needs_text_mask else None
    if not keys.own_keys:  # the text alone: plain causal attention
        out = F.scaled_dot_product_attention(q, keys.text_key, keys.text_value, attn_mask=mask,
                                             is_causal=mask is None, scale=scale, enable_gqa=True)
        return out.view(B, H, Q, D).transpose(1, 2).contiguous(), None
    P = len(keys.own_keys)
    own_mask = None
    if layout.query_passes[0] < P:  # some queries do not see every own key: [R = G*Qp, P]
        own_mask = layout.thought_mask(P, None).reshape(Qp, P).repeat(G, 1)
    # The pass blocks ride along only for their gradients: without any, passing P of them per
    # call (sampling) made a rollout's argument handling quadratic in k.
    blocks = (*keys.own_keys, *keys.own_values) if torch.is_grad_enabled() else ()
    out = _FusedThoughtAttention.apply(q, keys.text_key, keys.text_value, mask, own_mask, scale,
                                       layout.row_chunks(), Qp, keys, *blocks)
    return out.view(B, H, Q, D).transpose(1, 2).contiguous(), None


class _WholeThoughtAttention(torch.autograd.Function):
    """A call that holds every thought pass of selected rows (a whole thought scored at once by
    ``Rollout.score_rows``: ``ThoughtLayout.flash_own``) on CPU. Both parts by the flash kernel: the text
    part with the row's passes as query rows (``_text_flash`` folded), the own part as a causal
    attention of each row's Qp passes over themselves (batch = the rows); merged through their
    log-sum-exps. Nothing of size Qp x P is kept, and the own part's work is the kernel's.

    Backward: the merged output is a softmax over both key sets, so each kernel's backward,
    given the merged output and log-sum-exp (its probabilities then are the joint ones), gives
    exactly its keys' share of the joint gradient; the queries' gradients add.

    Shapes: q_text [B, H, S*Qp, D] (row-major: a row's passes adjacent), q_own [B*S, H, Qp, D],
    own_k / own_v [B*S, Hkv, Qp, D]; text keys [B, Hkv, L, D]; ``mask`` [B, 1, S*Qp, L] additive.
    """

    @staticmethod
    def forward(ctx, q_text, q_own, text_k, text_v, own_k, own_v, mask, scale, chunks):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        with torch.autocast(q_text.device.type, enabled=False):
            out_text, lse_text = _text_flash(q_text, text_k, text_v, mask, scale, chunks)
            out_own, lse_own = flash(q_own, own_k, own_v, 0.0, True, scale=scale)
            out_own, lse_own = _own_to_text(out_own, q_text.shape[0]), _own_to_text(lse_own, q_text.shape[0])
            lse = torch.logaddexp(lse_text, lse_own)                             # [B, H, S*Qp]
            work = torch.promote_types(q_text.dtype, torch.float32)
            out = ((lse_text - lse).exp().unsqueeze(-1) * out_text.to(work)
                   + (lse_own - lse).exp().unsqueeze(-1) * out_own.to(work)).to(q_text.dtype)
        ctx.save_for_backward(q_text, q_own, text_k, text_v, own_k, own_v, mask, out, lse)
        ctx.scale, ctx.chunks = scale, chunks
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q_text, q_own, text_k, text_v, own_k, own_v, mask, out, lse = ctx.saved_tensors
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        with torch.autocast(q_text.device.type, enabled=False):
            grad = grad.to(q_text.dtype).contiguous()
            dq_text, dk_text, dv_text = _text_flash_backward(grad, q_text, text_k, text_v, out, lse, mask,
                                                             ctx.scale, ctx.chunks)
            S = q_own.shape[0] // q_text.shape[0]
            dq_own, dk_own, dv_own = backward(_text_to_own(grad, S), q_own, own_k, own_v, _text_to_own(out, S),
                                              _text_to_own(lse, S), 0.0, True, scale=ctx.scale)
        return dq_text, dq_own, dk_text, dv_text, dk_own, dv_own, None, None, None


def _own_to_text(x: torch.Tensor, B: int) -> torch.Tensor:
    """[B*S, H, Qp, ...] (a row's passes as a sequence) -> [B, H, S*Qp, ...] (row-major rows)."""
    BS, H, Qp, *rest = x.shape
    return x.view(B, BS // B, H, Qp, *rest).transpose(1, 2).reshape(B, H, BS // B * Qp, *rest)


def _text_to_own(x: torch.Tensor, S: int) -> torch.Tensor:
    """The inverse of ``_own_to_text``, contiguous."""
    B, H, SQ, *rest = x.shape
    return x.view(B, H, S, SQ // S, *rest).transpose(1, 2).reshape(B * S, H, SQ // S, *rest).contiguous()


def _whole_thought_attention(query, key, value, keys: PassKeys, layout: ThoughtLayout, scale: float):
    """``_WholeThoughtAttention`` of a call's queries [B, H, Qp*S, D] and its own keys and values
    [B, Hkv, Qp*S, D] (pass-major blocks of S rows): [B, Qp*S, H, D]."""
    B, H, Q, D = query.shape
    Hkv, S = key.shape[1], layout.query_width
    Qp = Q // S
    rows = query.view(B, H, Qp, S, D).transpose(2, 3)                          # [B, H, S, Qp, D]
    q_text = rows.reshape(B, H, S * Qp, D)
    q_own = rows.transpose(1, 2).reshape(B * S, H, Qp, D)

    def own(x):  # [B, Hkv, Qp*S, D] -> [B*S, Hkv, Qp, D]
        return x.view(B, Hkv, Qp, S, D).permute(0, 3, 1, 2, 4).reshape(B * S, Hkv, Qp, D)

    mask = layout.additive_text_mask(query.dtype).repeat_interleave(Qp, 2)   # [B, 1, S*Qp, L]
    out = _WholeThoughtAttention.apply(q_text, q_own, keys.text_key, keys.text_value, own(key), own(value), mask,
                                       scale, _folded(layout.row_chunks(), Qp))
    return out.view(B, H, S, Qp, D).permute(0, 3, 2, 1, 4).reshape(B, Q, H, D)


def _sdpa_thought_attention(query, keys: PassKeys, layout: ThoughtLayout, scale: float):
    """The same pattern in one call of torch's ``scaled_dot_product_attention``, whose fused GPU
    kernels keep memory linear in L (the general path holds L x L scores per pass and head).

    SDPA gives no differentiable log-sum-exp, so the own-thought part joins the kernel as one extra
    key k*, placed before the text and seen by every query: its score for a query is the
    log-sum-exp of that query's own-thought scores (carried by an extra query feature that k*
    alone reads) and its value is a one-hot extra feature. The kernel's softmax then normalises the
    text part jointly with the whole own part, and the extra output feature is the own part's share
    of the probability mass; the own part's output (a softmax over at most P keys) is added with
    that share. A dummy first query keeps the kernel's plain causal mask right (query i+1 sees
    k* and text keys 0..i). Exact, gradients included, under any SDPA backend.
    """
    B, H, Q, D = query.shape
    text_k, text_v = keys.text_key, keys.text_value
    Hkv = text_k.shape[1]
    G = H // Hkv
    L, Lq = layout.text_len, layout.query_width
    Qp = len(layout.query_passes)
    width = -(-(D + 1) // 8) * 8  # D + 1 features, padded to a multiple of 8 for fused kernels
    q = query.reshape(B, Hkv, G, Qp, Lq, D)

    if keys.own_keys:  # the own-thought part, small: [.., L, P] scores, in float32 at least
        s_own = _masked_own_scores(q, keys, layout, scale)
        # Rows without own keys get score -1000 for k*: weight exp(-1000) = 0, finite in fp16.
        lse_own = torch.logsumexp(s_own, -1).clamp(min=-1000.0)
        own_out = _own_values(torch.softmax(s_own, -1), keys)
        extra = (lse_own / scale).to(query.dtype).unsqueeze(-1)
    else:
        extra = query.new_full((B, Hkv, G, Qp, Lq, 1), -1000.0 / scale)

    # Queries: a dummy row, then [q, extra, 0...]. Keys/values: k* = v* = e_D, then [k or v, 0...].
    qx = F.pad(torch.cat([q, extra], -1), (0, width - D - 1, 1, 0)).reshape(B, H * Qp, Lq + 1, width)
    star = query.new_zeros(B, Hkv, 1, width)
    star[..., D] = 1
    kx = torch.cat([star, F.pad(text_k, (0, width - D))], 2)
    vx = torch.cat([star, F.pad(text_v, (0, width - D))], 2)
    mask = None
    if layout.needs_text_mask:
        allowed = layout.text_mask(None)[:, 0, 0, 0]  # [B, Lq, L]
        mask = torch.ones(B, 1, Lq + 1, L + 1, dtype=torch.bool, device=query.device)
        mask[:, 0, 0, 1:] = False
        mask[:, 0, 1:, 1:] = allowed
    # Grouped heads without key copies where the fused kernels allow it (no mask), as transformers'
    # own SDPA path decides; with a mask the keys are copied to every (head, pass).
    gqa = mask is None
    if not gqa:
        kx, vx = kx.repeat_interleave(G * Qp, 1), vx.repeat_interleave(G * Qp, 1)
    out = F.scaled_dot_product_attention(qx, kx, vx, attn_mask=mask, is_causal=mask is None,
                                         scale=scale, enable_gqa=gqa)
    out = out[:, :, 1:].reshape(B, Hkv, G, Qp, Lq, width)
    text_part = out[..., :D]
    if keys.own_keys:
        text_part = text_part + (out[..., D:D + 1].to(own_out.dtype) * own_out).to(query.dtype)
    return text_part.reshape(B, H, Q, D).transpose(1, 2).contiguous(), None


def _plain_attention(module, query, key, value, attention_mask, scaling, dropout, softcap, sliding_window):
    """Ordinary causal attention for calls outside thought mode (masks come from ``sdpa_mask``)."""
    if softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window)
    # SDPA has no softcap (Gemma-2): eager attention with the boolean mask.
    B, H, Q, D = query.shape
    G = H // key.shape[1]
    k = key.repeat_interleave(G, dim=1)
    v = value.repeat_interleave(G, dim=1)
    scale = scaling if scaling is not None else D ** -0.5
    scores = torch.matmul(query, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        K = k.shape[2]
        qi = torch.arange(Q, device=query.device)[:, None] + (K - Q)
        kj = torch.arange(K, device=query.device)[None, :]
        attention_mask = kj <= qi
        if sliding_window is not None:
            attention_mask = attention_mask & (qi - kj < sliding_window)
    elif attention_mask.dtype != torch.bool:
        scores = scores + attention_mask
        attention_mask = None
    if attention_mask is not None:
        # The dtype's minimum, not -inf: a left-padding query that may see no key at all then gets
        # a finite (unused) output instead of NaN, which would leak into later layers via 0 * NaN.
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if dropout > 0:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), None


def install(model) -> None:
    """Route every attention layer of ``model`` (a transformers PreTrainedModel) to ours."""
    if not getattr(model, "_supports_attention_backend", False):
        raise NotImplementedError(
            f"{type(model).__name__} does not route its attention through transformers' "
            "AttentionInterface, so quietstar cannot give thoughts their attention pattern without "
            "editing the model file. Use a model family that supports custom attention "
            "implementations (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, GPT-2, SmolLM ...).")
    AttentionInterface.register(ATTENTION_NAME, thought_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)
