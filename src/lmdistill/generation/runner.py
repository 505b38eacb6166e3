"""A causal LM driven step by step over a left-padded batch, with its own KV cache.

Layout of a row: ``[pad ... pad | prompt | response tokens fed so far]``. Prompts are left-padded
to a common width P so every row's response starts at column P. Position ids skip the padding:
the prompt of row b sits at positions ``0 .. len_b - 1`` and response token t at ``len_b + t``,
exactly as in an unpadded forward, so cached step logits equal a full forward over the same tokens.
"""

from __future__ import annotations

import torch


class CachedLM:
    def __init__(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int):
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

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, width: int, keep: int) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask[:, :width], position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        return out.logits

    def _reset(self) -> None:
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

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed response token ``fed`` of every row (``[B]``); return the ``[B, V]`` logits for the next."""
        positions = (self.prompt_len + self.fed)[:, None]
        self.fed += 1
        return self._forward(tokens.to(self.device)[:, None], positions, self.prompt_width + self.fed, 1)[:, -1]

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``[B, k]`` response tokens at once; return ``[B, k, V]`` logits (position i predicts token i+1)."""
        k = tokens.shape[1]
        positions = self.prompt_len[:, None] + self.fed + torch.arange(k, device=self.device)[None, :]
        self.fed += k
        return self._forward(tokens.to(self.device), positions, self.prompt_width + self.fed, 0)

    def crop(self, keep: int) -> None:
        """Keep the prompt and the first ``keep`` response tokens in the cache (drop the rest)."""
        if not 0 <= keep <= self.fed:
            raise ValueError(f"cannot keep {keep} response tokens, the cache holds {self.fed}")
        if keep < self.fed:
            self.cache.crop(keep - self.fed)
        self.fed = keep
