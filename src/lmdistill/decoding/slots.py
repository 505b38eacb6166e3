"""The KV layout of a serving batch: slots of one preallocated cache, each an independent sequence.

A ``SlotBatch`` holds up to ``rows`` sequences in the rows of a ``FastDecoder`` cache. Row r's tokens sit at
columns 0 .. len_r - 1 with positions equal to their columns, exactly as the sequence run alone, and attend
to nothing outside the row, so a row's logits are its own forward's whatever the other rows hold.

The live rows are always 0 .. n - 1: ``add`` prefills a new sequence into row n (one forward over its
prompt), ``step`` feeds one token to every live row at its own column (one batched forward), and ``remove``
frees a row by moving the last live row into it (a copy of that row's columns), so every forward runs on a
leading slice of the cache, never a gather. The columns grow in chunks of ``CHUNK`` as longer requests are
admitted (never past the model's RoPE table).

Prefix reuse: the batch remembers which tokens every row's columns hold (live rows, and free rows' leftovers
from the sequence that held them last). A new prompt sharing a prefix with one of them (a chat template's system
prompt, an earlier turn of the same conversation) copies those columns instead of recomputing them and prefills
only the rest: keys and values at a position depend only on the tokens up to it, so the copied columns are
what its own prefill would write (to rounding: a float32 matmul over fewer rows may round differently).
Requests that need the prompt's logits (``keep=0``) prefill in full.
"""

from __future__ import annotations

import torch

from lmdistill.generation.fast_decoder import FastDecoder

CHUNK = 256  # columns are allocated in multiples of this


class SlotBatch:
    def __init__(self, model, rows: int, max_position: int):
        self.model = model
        self.decoder = FastDecoder(model, rows, CHUNK, max_position)
        self.lens: list[int] = []  # columns held by each live row
        self.tokens: list[list[int]] = [[] for _ in range(rows)]  # the tokens every row's columns hold
        self.reused = 0  # prompt tokens copied instead of prefilled
        weight = model.get_input_embeddings().weight
        self.dtype, self.device = weight.dtype, weight.device

    @property
    def size(self) -> int:
        return len(self.lens)

    @property
    def free(self) -> int:
        return self.decoder.batch - len(self.lens)

    def fits(self, columns: int) -> bool:
        """Whether a sequence of ``columns`` tokens fits the RoPE table (positions 0 .. columns - 1)."""
        return columns <= self.decoder.max_position + 1

    def matches(self, model) -> bool:
        """Whether the cache was built for ``model`` as it is now (same dtype and device)."""
        weight = model.get_input_embeddings().weight
        return model is self.model and weight.dtype == self.dtype and weight.device == self.device

    def add(self, ids: list[int], reserve: int, keep: int = 1) -> torch.Tensor:
        """Prefill ``ids`` into a new row (the last); return the ``[keep or len(ids), V]`` logits of its last
        ``keep`` positions (0: all). ``reserve``: the most columns the row will ever hold."""
        if not self.free:
            raise ValueError("no free row")
        need = -(-max(reserve, len(ids)) // CHUNK) * CHUNK
        self.decoder.grow(min(need, self.decoder.max_position + 1))
        row = len(self.lens)
        start = 0
        if keep and self.decoder.keys:
            start, src = self._longest_prefix(ids)
            if start and src != row:
                self.decoder.copy_row(src, row, start)
            self.reused += start
        tokens = torch.tensor([ids[start:]], device=self.device)
        logits = self.decoder.forward_rows(tokens, torch.full((1,), start, dtype=torch.long, device=self.device), row,
                                           keep)
        self.lens.append(len(ids))
        self.tokens[row] = list(ids)
        return logits[0]

    def _longest_prefix(self, ids: list[int]) -> tuple[int, int]:
        """``(n, row)``: the most leading tokens of ``ids`` some row's columns hold (at most ``len(ids) - 1``: the
        last one is fed to get its logits), and that row (the new row itself first: no copy then)."""
        import os

        best, src = 0, len(self.lens)
        for r in (src, *range(len(self.tokens))):
            held = self.tokens[r]
            if held and held[0] == ids[0]:
                n = min(len(os.path.commonprefix([held, ids])), len(ids) - 1)
                if n > best:
                    best, src = n, r
        return best, src

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens[r]`` to live row r (one each, in row order); return the ``[n, V]`` next-token logits."""
        if len(tokens) != len(self.lens):
            raise ValueError(f"{len(self.lens)} live rows, {len(tokens)} tokens")
        starts = torch.tensor(self.lens, device=self.device)
        logits = self.decoder.forward_rows(torch.tensor(tokens, device=self.device)[:, None], starts, 0, 1)
        self.lens = [n + 1 for n in self.lens]
        for held, token in zip(self.tokens, tokens):
            held.append(token)
        return logits[:, -1]

    def remove(self, row: int) -> int | None:
        """Free ``row``; the last live row moves into it. Returns the row that moved (``None``: none did)."""
        last = len(self.lens) - 1
        if row == last:
            self.lens.pop()
            return None
        self.decoder.copy_row(last, row, self.lens[last])
        self.lens[row] = self.lens.pop()
        self.tokens[row] = list(self.tokens[last])  # row ``last`` keeps them too, free now
        return last
