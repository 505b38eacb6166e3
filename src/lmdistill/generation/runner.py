"""A causal LM driven step by step over a left-padded batch, with its own KV cache.

Layout of a row: ``[pad ... pad | prompt | response tokens fed so far]``. Prompts are left-padded
to a common width P so every row's response starts at column P. Position ids skip the padding:
the prompt of row b sits at positions ``0 .. len_b - 1`` and response token t at ``len_b + t``,
exactly as in an unpadded forward, so cached step logits equal a full forward over the same tokens.

Two backends compute the same logits: ``fast`` (``fast_decoder.FastDecoder``: the Llama-family forward
written out over the model's weights, preallocated cache) and ``hf`` (``model(...)`` with a
``DynamicCache``: any architecture). ``auto`` takes ``fast`` when the model supports it.

A runner only computes logits; turning them into tokens (the ``no_repeat_ngram_size`` ban, temperature, top-k,
top-p, greedy) is ``sampling.pick``'s, the same for both backends, so they pick the same tokens.
"""

from __future__ import annotations

import logging

import torch

from lmdistill.errors import ConfigError
from lmdistill.generation.fast_decoder import FastDecoder, unsupported_reason
from lmdistill.models.kv_cache import cache_kwargs

BACKENDS = ("auto", "fast", "hf")
logger = logging.getLogger("lmdistill.generation")
_noted: set[str] = set()


def note_hf_fallback(model, why: str) -> None:
    """Say once per process and model type that ``auto`` decodes ``model`` with the HF forward, and why."""
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    if kind not in _noted:
        _noted.add(kind)
        logger.warning(f"decoding {kind} with the HF forward: the fast decoder does not run it ({why})")


class CachedLM:
    def __init__(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                 backend: str = "auto"):
        if backend not in BACKENDS:
            raise ConfigError(f"decode backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.model = model
        self.device = next(model.parameters()).device
        self.prompt_ids = prompt_ids.to(self.device)
        b, p = self.prompt_ids.shape
        self.prompt_width = p
        self.prompt_len = prompt_mask.to(self.device).sum(1)
        # one mask buffer for the whole run: the prompt's, then ones; each call takes a prefix view
        self.mask = torch.ones((b, p + max_new_tokens + 1), dtype=torch.long, device=self.device)
        self.mask[:, :p] = prompt_mask.to(self.device)
        self.cache = None
        self.fed = 0  # response tokens in the cache
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.fast = None
        if backend != "hf":
            capacity = self.mask.shape[1]
            why = unsupported_reason(model, capacity)
            if why is None:
                max_position = int(self.prompt_len.max()) + max_new_tokens + 1
                self.fast = FastDecoder(model, b, capacity, max_position)
                self.allowed = self.mask.bool()
            elif backend == "fast":
                raise ConfigError(f"decode backend 'fast' cannot run {type(model).__name__}: {why}")
            else:
                note_hf_fallback(model, why)
        self.backend = "fast" if self.fast is not None else "hf"

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, width: int, keep: int) -> torch.Tensor:
        if self.fast is not None:
            return self.fast.forward(ids, positions, width - ids.shape[1], self.allowed, keep)
        out = self.model(input_ids=ids, attention_mask=self.mask[:, :width], position_ids=positions,
                         **cache_kwargs(self.model, self.cache), use_cache=True, logits_to_keep=keep)
        return out.logits

    def _reset(self) -> None:
        if self.fast is None:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.model.config)
        self.fed = 0

    def prefill(self) -> torch.Tensor:
        """Run the prompt (on a fresh cache); return ``[B, V]`` logits predicting response token 0."""
        self._reset()
        positions = (self.mask[:, :self.prompt_width].cumsum(1) - 1).clamp(min=0)
        return self._forward(self.prompt_ids, positions, self.prompt_width, 1)[:, -1]

    def score(self, response: torch.Tensor) -> torch.Tensor:
        """One forward over prompt + ``response`` ``[B, N]``; return ``[B, N, V]``: position t predicts token t.

        The cache keeps prompt + ``response[:, :N-1]`` (``fed = N - 1``), so later calls can crop and extend.
        """
        self._reset()
        k = response.shape[1] - 1
        ids = torch.cat([self.prompt_ids, response[:, :k].to(self.device)], 1)
        positions = torch.cat([(self.mask[:, :self.prompt_width].cumsum(1) - 1).clamp(min=0),
                               self.prompt_len[:, None] + torch.arange(k, device=self.device)[None, :]], 1)
        self.fed = k
        return self._forward(ids, positions, self.prompt_width + k, k + 1)

    def sync(self, tokens: torch.Tensor, upto: int) -> None:
        """Make the cache hold exactly response tokens ``tokens[:, :upto]``, cropping or feeding as needed."""
        if upto < self.fed:
            self.crop(upto)
        elif upto > self.fed:
            self.extend(tokens[:, self.fed:upto])

    def logits_at(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """The ``[B, V]`` logits predicting response position ``t`` of ``tokens``; the cache then holds ``tokens[:, :t]``."""
        if t == 0:
            return self.prefill()
        self.sync(tokens, t - 1)
        return self.step(tokens[:, t - 1])

    @property
    def can_skip_rows(self) -> bool:
        """``step(..., rows=k)`` may leave rows out: their cache columns stay as they were (fast backend)."""
        return self.fast is not None

    def step(self, tokens: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Feed response token ``fed`` of every row (``[B]``); return the ``[B, V]`` logits for the next.

        ``rows=k`` (only where ``can_skip_rows``): feed the first k rows only and return ``[k, V]``; the
        other rows' column ``fed`` keeps what it holds (valid when their token there is unchanged).
        """
        positions = (self.prompt_len + self.fed)[:, None]
        self.fed += 1
        if rows is not None and rows < positions.shape[0]:
            if not self.can_skip_rows:
                raise ValueError("only the fast backend can feed a subset of rows")
            if rows == 0:
                return torch.empty((0, self.vocab), device=self.device)
            return self.fast.forward(tokens.to(self.device)[:rows, None], positions[:rows], self.fed - 1 + self.prompt_width,
                                     self.allowed[:rows], 1)[:, -1]
        return self._forward(tokens.to(self.device)[:, None], positions, self.prompt_width + self.fed, 1)[:, -1]

    def reorder(self, order: torch.Tensor) -> None:
        """Permute the batch's rows (row ``i`` becomes old row ``order[i]``): prompts, masks and cache."""
        order = order.to(self.device)
        self.prompt_ids, self.prompt_len, self.mask = self.prompt_ids[order], self.prompt_len[order], self.mask[order]
        if self.fast is not None:
            self.allowed = self.allowed[order]
            self.fast.reorder(order)
        elif self.cache is not None:
            self.cache.reorder_cache(order)

    def extend(self, tokens: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Feed ``[B, k]`` response tokens at once; return ``[B, k, V]`` logits (position i predicts token i+1).

        ``rows``: as in ``step``, the first rows only (``[rows, k, V]``; where ``can_skip_rows``).
        """
        k = tokens.shape[1]
        positions = self.prompt_len[:, None] + self.fed + torch.arange(k, device=self.device)[None, :]
        self.fed += k
        if rows is not None and rows < positions.shape[0]:
            if not self.can_skip_rows:
                raise ValueError("only the fast backend can feed a subset of rows")
            if rows == 0:
                return torch.empty((0, k, self.vocab), device=self.device)
            return self.fast.forward(tokens.to(self.device)[:rows], positions[:rows], self.prompt_width + self.fed - k,
                                     self.allowed[:rows], 0)
        return self._forward(tokens.to(self.device), positions, self.prompt_width + self.fed, 0)

    def crop(self, keep: int) -> None:
        """Keep the prompt and the first ``keep`` response tokens in the cache (drop the rest)."""
        if not 0 <= keep <= self.fed:
            raise ValueError(f"cannot keep {keep} response tokens, the cache holds {self.fed}")
        if keep < self.fed and self.fast is None:
            self.cache.crop(keep - self.fed)
        self.fed = keep
