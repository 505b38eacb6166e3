"""Turn next-token logits into tokens: the n-gram ban, temperature, top-k, top-p, greedy, Gumbel-max with given noise.

Order, as in transformers' ``generate`` (logits processors such as ``NoRepeatNGramLogitsProcessor`` run before
the temperature / top-k / top-p warpers): banned ids -> -inf, then divide by the temperature, then top-k, then
top-p; greedy takes the argmax of the banned logits.
"""

from __future__ import annotations

import torch

from lmdistill.generation.config import SamplingConfig


def banned_ngram_mask(context: torch.Tensor, start: torch.Tensor | None, n: int, vocab: int) -> torch.Tensor:
    """``[B, vocab]`` bool: the ids that would complete an n-gram already present in each row's context.

    Row ``b``'s context is ``c = context[b, start[b]:]`` (``start``: the first real column, e.g. after left
    padding; ``None`` = 0), of length ``L_b``. With ``s = c[L_b-n+1:]`` (its last ``n - 1`` tokens), id ``v`` is
    banned iff some ``i`` with ``0 <= i <= L_b - n`` has ``c[i:i+n-1] == s`` and ``c[i+n-1] == v``; for ``n = 1``
    every id in ``c`` is banned; nothing is banned when ``L_b < n``. This is transformers'
    ``NoRepeatNGramLogitsProcessor`` (``_get_ngrams`` / ``_get_generated_ngrams`` in
    ``transformers/generation/logits_process.py``), which MiniLLM's and DistiLLM's evaluation call through
    ``GenerationConfig(no_repeat_ngram_size=...)`` (LMOps ``minillm/evaluate_main.py:61``, distillm
    ``evaluate_main.py:50``), computed for the whole batch with tensor ops: one ``unfold`` into the
    ``L - n + 1`` windows, one comparison with the suffix, one scatter (``O(B * L * n)`` per step).
    Ids ``>= vocab`` in the context are ignored (they cannot be drawn).
    """
    b, width = context.shape
    dev = context.device
    out = torch.zeros((b, vocab + 1), dtype=torch.bool, device=dev)  # column ``vocab``: sink for non-matches
    if n < 1 or width < n:
        return out[:, :vocab]
    windows = context.unfold(1, n, 1)  # [B, W, n]: window i = context[:, i:i+n]
    suffix = context[:, width - n + 1:]  # [B, n-1]
    match = (windows[:, :, :n - 1] == suffix[:, None, :]).all(-1)  # n = 1: all() over nothing is True
    if start is not None:  # windows must lie inside the row (so must the suffix: implied, as i <= W-1 < suffix start)
        match &= torch.arange(windows.shape[1], device=dev)[None, :] >= start.to(dev)[:, None]
    nxt = windows[:, :, n - 1]
    idx = torch.where(match & (nxt < vocab), nxt, torch.full_like(nxt, vocab))
    return out.scatter_(1, idx, True)[:, :vocab]


def ban_ngrams(logits: torch.Tensor, context: torch.Tensor, start: torch.Tensor | None, n: int) -> torch.Tensor:
    """``logits`` ``[B, V]`` with the ids of ``banned_ngram_mask(context, start, n, V)`` set to -inf (n = 0: as is)."""
    if n < 1:
        return logits
    mask = banned_ngram_mask(context, start, n, logits.shape[-1]).to(logits.device)
    return logits.masked_fill(mask, float("-inf"))


class NgramBan:
    """``no_repeat_ngram_size`` for one left-padded batch: each row's context is its prompt without the
    padding, then the response tokens written so far.

    ``mask(response)`` takes the ``[k, t]`` response tokens of the first ``k`` rows (in the current row order)
    and returns their ``[k, vocab]`` banned ids; ``select(rows)`` follows a re-ordering of the rows (as
    ``NoiseSource.select`` does), so loops that move rows around (``decode.ActiveRows``) keep it aligned.
    """

    def __init__(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int, vocab: int):
        self.prompt_ids, self.prompt_mask, self.n, self.vocab = prompt_ids, prompt_mask, n, vocab
        self.start = prompt_ids.shape[1] - prompt_mask.long().sum(1)  # first prompt column of each row

    @classmethod
    def of(cls, batch) -> "NgramBan | None":
        """The ban of a ``Batch`` (``None`` when ``config.no_repeat_ngram_size`` is 0)."""
        n = batch.config.no_repeat_ngram_size
        return cls(batch.prompt_ids, batch.prompt_mask, n, batch.vocab) if n else None

    def select(self, rows) -> "NgramBan":
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.prompt_ids.device)
        return NgramBan(self.prompt_ids[idx], self.prompt_mask[idx], self.n, self.vocab)

    def mask(self, response: torch.Tensor) -> torch.Tensor:
        k = response.shape[0]
        context = torch.cat([self.prompt_ids[:k], response.to(self.prompt_ids.device)], 1)
        return banned_ngram_mask(context, self.start[:k], self.n, self.vocab)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                  banned: torch.Tensor | None = None) -> torch.Tensor:
    """Set the ``banned`` ids (bool, same shape), then every id outside the top-k, then outside the top-p
    nucleus, to -inf (last dim = vocab).

    The nucleus is the smallest set of most probable ids whose mass reaches ``top_p``; the most
    probable id is always kept. Banning first matches transformers (processors before warpers): top-k and
    top-p then choose among the allowed ids.
    """
    if banned is not None:
        logits = logits.masked_fill(banned.to(logits.device), float("-inf"))
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def scaled_logits(logits: torch.Tensor, config: SamplingConfig, banned: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (float32) with ``banned`` ids at -inf, divided by the temperature and filtered; the distribution
    tokens are drawn from."""
    x = logits.float()
    if config.temperature != 1.0:
        x = x / config.temperature   # banned ids become -inf in filter_logits; -inf / T would be -inf alike
    return filter_logits(x, config.top_k, config.top_p, banned)


def pick(logits: torch.Tensor, config: SamplingConfig, gumbel: torch.Tensor | None, *,
         scaled: bool = False, banned: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from ``[B, V]`` logits: argmax when greedy, else Gumbel-max with ``gumbel`` ``[B, V]``.

    ``banned`` (``[B, V]`` bool, e.g. ``NgramBan.mask``): ids that may not be drawn (-inf before anything else;
    greedy too). ``scaled=True``: the logits are already divided by the temperature (top-k / top-p still apply).
    If every id of a row is banned the row gets id 0 (all logits are -inf; transformers' greedy does the same).
    """
    if config.greedy:
        if banned is not None:
            logits = logits.masked_fill(banned.to(logits.device), float("-inf"))
        return logits.argmax(-1)
    if scaled:
        x = filter_logits(logits.float(), config.top_k, config.top_p, banned)
    else:
        x = scaled_logits(logits, config, banned)
    return (x + gumbel.to(logits.device)).argmax(-1)
