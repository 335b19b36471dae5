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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from quietstar.method.vocab import VocabHead


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
