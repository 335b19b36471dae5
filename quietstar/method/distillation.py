"""The distillation loss: KL(teacher || student) of next-token distributions, a chunk of rows at a time.

A thinking teacher's prediction at position i is its mixed hidden state's (base where it did not
think) through its LM head; the student is a plain LM. Per row, with z the logits and T the
temperature:

    kl_i = T^2 * sum_v p_t(v) (log p_t(v) - log p_s(v)),   p = softmax(z / T)

(the T^2 keeps the gradient's scale independent of T, Hinton et al. 2015). Both heads' logits
exist for ``chunk_rows`` rows at a time: each chunk runs under ``torch.utils.checkpoint``, which
keeps only the chunk's hidden states and recomputes its logits in the backward, so no
[tokens x V] tensor outlives its chunk. The teacher's ids at -inf (its meta tokens) have
p_t = 0 and add nothing (``xlogy``: 0 log 0 = 0); the student's head is taken as the caller
gives it (unmasked for a model that will predict over all its rows).

From a top-k cache (``teacher_top_k`` writes it, ``top_k_distillation_kl`` reads it) the teacher
is known on its k most likely ids K and, as one bucket, on the rest R (the mass outside K). The
loss is the KL between both distributions lumped onto K and R:

    kl_i = T^2 * [ sum_{v in K} p_t(v) (log p_t(v) - log p_s(v)) + p_t(R) (log p_t(R) - log p_s(R)) ],
    p(R) = sum_{v not in K} p(v)

It is at most the full KL (lumping never adds information), equals it when k = V, and its
gradient in the student's logits is p_s(v) - p_t(v) on K and p_s(v) (1 - p_t(R) / p_s(R)) off K
(times T): the tail's mass is kept, spread as the student spreads it, rather than dropped (the
renormalised top-k would ask the student to put all its mass on K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from quietstar.method.vocab import VocabHead


def _float32(z: torch.Tensor) -> torch.Tensor:
    return z.to(torch.promote_types(z.dtype, torch.float32))


def distillation_kl(student: VocabHead, hidden: torch.Tensor, teacher: VocabHead, teacher_hidden: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """T^2 KL(softmax(z_teacher / T) || softmax(z_student / T)) per row: hidden [..., d] (with
    gradients), teacher_hidden [..., d_t] (detached) -> [...] in float32 at least."""
    if hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student rows {tuple(hidden.shape[:-1])} and teacher rows "
                         f"{tuple(teacher_hidden.shape[:-1])} differ")
    h = hidden.reshape(-1, hidden.shape[-1])                            # [N, d]
    t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])   # [N, d_t]

    def piece(h_part: torch.Tensor, t_part: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            zt = teacher.logits(t_part)                                  # [c, V]
            p_teacher = torch.softmax(zt.to(torch.promote_types(zt.dtype, torch.float32)) / temperature, -1)
        zs = student.logits(h_part)                                      # [c, V], with gradients
        logp_student = torch.log_softmax(zs.to(torch.promote_types(zs.dtype, torch.float32)) / temperature, -1)
        # xlogy(p, p) - p log q: rows where p = 0 (the teacher's masked ids) add 0, not nan
        return F.kl_div(logp_student, p_teacher, reduction="none").sum(-1) * temperature ** 2

    recompute = torch.is_grad_enabled() and student.chunk_rows > 0
    parts = [checkpoint(piece, h[rows], t[rows], use_reentrant=False) if recompute else piece(h[rows], t[rows])
             for rows in student.chunks(h.shape[0])]
    out = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.promote_types(h.dtype, torch.float32))
    return out.view(hidden.shape[:-1])


@torch.no_grad()
def teacher_top_k(teacher: VocabHead, teacher_hidden: torch.Tensor, k: int,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's k most likely ids at temperature T per row, a chunk of rows at a time:
    teacher_hidden [N, d] -> (ids [N, k] int64, their log p_t [N, k], log p_t(rest) [N]) in float32
    (log p_t(rest) = -inf where the k ids hold all the mass: k = V)."""
    ids, logprobs, rest = [], [], []
    for rows in teacher.chunks(teacher_hidden.shape[0]):
        logp = torch.log_softmax(_float32(teacher.logits(teacher_hidden[rows])) / temperature, -1)  # [c, V]
        top = logp.topk(k, dim=-1)                                                                  # [c, k]
        ids.append(top.indices)
        logprobs.append(top.values)
        rest.append(logp.scatter(1, top.indices, float("-inf")).logsumexp(-1))                     # [c]
    if not ids:
        return (teacher_hidden.new_zeros(0, k, dtype=torch.long), teacher_hidden.new_zeros(0, k, dtype=torch.float32),
                teacher_hidden.new_zeros(0, dtype=torch.float32))
    return torch.cat(ids), torch.cat(logprobs), torch.cat(rest)


def top_k_distillation_kl(student: VocabHead, hidden: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                          rest: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 KL(teacher || student) on the teacher's top-k ids and the rest (the module's formula)
    per row: hidden [N, d] (with gradients), the cached ids [N, k], log p_t [N, k] and
    log p_t(rest) [N] (all at temperature T) -> [N] in float32 at least. Both heads' chunking as
    ``distillation_kl``."""
    if not (hidden.shape[:-1] == ids.shape[:-1] == logprobs.shape[:-1] == rest.shape):
        raise ValueError(f"student rows {tuple(hidden.shape[:-1])} and cached rows {tuple(ids.shape[:-1])}, "
                         f"{tuple(logprobs.shape[:-1])}, {tuple(rest.shape)} differ")
    ids, logprobs, rest = ids.long(), logprobs.float(), rest.float()

    def piece(h_part: torch.Tensor, ids_part: torch.Tensor, lp_part: torch.Tensor,
              rest_part: torch.Tensor) -> torch.Tensor:
        logq = torch.log_softmax(_float32(student.logits(h_part)) / temperature, -1)    # [c, V]
        p = lp_part.exp()                                                                # [c, k]
        # p = 0 (a masked teacher id among the k) adds 0, and no 0 * inf
        on_k = torch.where(p > 0, p * (lp_part - logq.gather(1, ids_part)), 0.0).sum(-1)  # [c]
        if ids_part.shape[1] == logq.shape[1]:  # k = V: no rest (its log p_s would be -inf)
            return on_k * temperature ** 2
        logq_rest = logq.scatter(1, ids_part, float("-inf")).logsumexp(-1)               # [c]
        p_rest = rest_part.exp()
        off_k = torch.where(p_rest > 0, p_rest * (rest_part - logq_rest), 0.0)
        return (on_k + off_k) * temperature ** 2

    recompute = torch.is_grad_enabled() and student.chunk_rows > 0
    parts = [checkpoint(piece, hidden[r], ids[r], logprobs[r], rest[r], use_reentrant=False) if recompute
             else piece(hidden[r], ids[r], logprobs[r], rest[r]) for r in student.chunks(hidden.shape[0])]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
