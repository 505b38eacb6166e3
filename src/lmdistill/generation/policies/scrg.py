"""``scrg``: MGSR's sequence correction and re-generation (arXiv 2407.10068, METHODS.md).

1. The student samples a response y (its step logits q_t are kept: they equal a full forward).
2. One teacher forward over prompt + y gives p_t at every response position.
3. d_t = KL(p_t || q_t) (``per_token_divergence("fkl", ...)`` at the sampling temperature, 1 when
   greedy). Candidates: positions t < length where y_t differs from the teacher's argmax. The error
   position j is the candidate with the largest d_t (the first one on ties).
4. y_j becomes the teacher's argmax (tag 2, corrected); the student re-generates from j + 1 on.
   Rows correct at different positions, so the student cache is cropped to the earliest j of the
   batch and each row re-feeds its own kept tokens up to its j before sampling again (only the
   suffix after min j is new work; one batched step per position).
5. ``n_corrections`` rounds; later rounds re-score only the changed suffix (the teacher cache is
   cropped and extended). A row without candidates is kept unchanged (our choice; the paper is silent).

``stats["correction_positions"]``: j per round that corrected; ``stats["regenerated_tokens"]``:
tokens sampled anew after corrections. Memory: the student's step logits, ``[B, N, V]``, are kept.
"""

from __future__ import annotations

import torch

from lmdistill.generation.batch import CORRECTED, PADDING, STUDENT, Batch, Decoded, source_tags
from lmdistill.generation.decode import sample_loop
from lmdistill.losses import per_token_divergence


def error_positions(tokens: torch.Tensor, lengths: torch.Tensor, student_logits: torch.Tensor,
                    teacher_logits: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(j [B], has_candidate [B])``: argmax of KL(p||q) over positions whose token differs from the
    teacher's argmax (within each row's length). ``j`` is -1 where no position qualifies."""
    n = int(lengths.max())  # positions past every row's end cannot be candidates
    tokens, student_logits, teacher_logits = tokens[:, :n], student_logits[:, :n], teacher_logits[:, :n]
    teacher_top = teacher_logits.argmax(-1)
    valid = torch.arange(n, device=tokens.device)[None, :] < lengths[:, None]
    candidate = valid & (tokens != teacher_top)
    kl = torch.stack([per_token_divergence("fkl", student_logits[b], teacher_logits[b], temperature=temperature)
                      for b in range(tokens.shape[0])])
    j = torch.where(candidate, kl, torch.full_like(kl, float("-inf"))).argmax(-1)
    has = candidate.any(-1)
    return torch.where(has, j, torch.full_like(j, -1)), has


def run(student, teacher, batch: Batch) -> Decoded:
    cfg, n, v, dev = batch.config, batch.max_new_tokens, batch.vocab, batch.device
    s_lm = batch.runner(student)
    first = s_lm.prefill()
    q = torch.zeros((batch.size, n, v), dtype=first.dtype, device=dev)
    tokens, lengths = sample_loop(s_lm, first, batch, record=q)
    sources = source_tags(lengths, n, STUDENT)
    stats = [{"correction_positions": [], "regenerated_tokens": 0} for _ in range(batch.size)]
    if cfg.n_corrections == 0:
        return Decoded(tokens, lengths, sources, stats)
    t_lm = batch.runner(teacher)
    width = int(lengths.max())  # score up to the longest response only
    p = torch.zeros_like(q)
    p[:, :width] = t_lm.score(tokens[:, :width])[:, :, :v].to(dev)
    pos = torch.arange(n, device=dev)[None, :]
    for rnd in range(1, cfg.n_corrections + 1):
        j, has = error_positions(tokens, lengths, q, p, cfg.divergence_temperature)
        if not bool(has.any()):
            break
        rows = has.nonzero().flatten()
        tokens[rows, j[rows]] = p[rows, j[rows]].argmax(-1)
        lo = int(j[rows].min())
        s_lm.sync(tokens, lo)
        free_from = torch.where(has, j + 1, torch.full_like(j, n))
        tokens, lengths = sample_loop(s_lm, q[:, lo], batch, stream=rnd, start=lo, tokens=tokens, lengths=lengths,
                                      free_from=free_from, record=q)
        regen = has[:, None] & (pos > j[:, None])
        sources = torch.where(regen, torch.where(pos < lengths[:, None], STUDENT, PADDING), sources)
        sources[rows, j[rows]] = CORRECTED
        for b in rows.tolist():
            stats[b]["correction_positions"].append(int(j[b]))
            stats[b]["regenerated_tokens"] += int(lengths[b]) - int(j[b]) - 1
        if rnd < cfg.n_corrections:  # re-score the changed suffix only
            t_lm.sync(tokens, lo)
            if lo < n - 1:
                p[:, lo + 1:] = t_lm.extend(tokens[:, lo:n - 1])[:, :, :v].to(dev)
    return Decoded(tokens, lengths, sources, stats)
