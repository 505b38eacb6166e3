"""The scores of given tokens: ``TokenLogprob`` and the batched scorer of a token under each row of logits.

A token's score under a ``[V]`` logits row is ``log p(token) = log_softmax(logits)[token]`` of the raw logits (no
temperature: vLLM's default), its rank ``1 + #{v : log p(v) > log p(token)}`` (1 = most likely; ties share the
better rank), and the ``k`` most likely tokens with their log-probabilities. Generated tokens and prompt tokens
(``prompt_logprobs``, ``echo``) are scored the same way, by every token source (``decoder``, ``batcher``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORE_CHUNK = 512  # prompt positions per log_softmax, so a long prompt never holds [T, V] float32 twice


@dataclass
class TokenLogprob:
    """The score of one token: its log-probability and rank (1 = most likely) and the ``k`` most likely tokens."""

    token: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


def score_rows(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """``TokenLogprob`` of ``targets[t]`` under ``logits[t]`` ([T, V], any dtype) with the top ``k``, batched."""
    out: list[TokenLogprob] = []
    tgt = torch.tensor(targets, device=logits.device, dtype=torch.long)
    k = min(k, logits.shape[-1])
    for s in range(0, len(targets), SCORE_CHUNK):
        lp = torch.log_softmax(logits[s:s + SCORE_CHUNK].float(), dim=-1)
        t = tgt[s:s + SCORE_CHUNK]
        actual = lp.gather(1, t[:, None])[:, 0]
        rank = (lp > actual[:, None]).sum(-1) + 1
        if k > 0:
            vals, idx = lp.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        else:
            tops = [[] for _ in range(len(t))]
        out += [TokenLogprob(a, b, c, d) for a, b, c, d in zip(t.tolist(), actual.tolist(), rank.tolist(), tops)]
    return out


def prompt_scores(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """The scores of a prompt's tokens from the ``[len(ids), V]`` logits of one forward over it: ``None`` for
    the first token (nothing predicts it), then ``ids[t]`` under ``logits[t - 1]``."""
    return [None, *score_rows(logits[:-1], ids[1:], k)]


def score_token(logits: torch.Tensor, token: int, k: int | None, stop_ids: set[int]) -> TokenLogprob | None:
    """The chosen token's score under its step's ``[V]`` logits, when asked (``k`` not ``None``); never for a stop
    token (it is not part of the answer)."""
    if k is None or token in stop_ids:
        return None
    return score_rows(logits[None], [token], k)[0]
