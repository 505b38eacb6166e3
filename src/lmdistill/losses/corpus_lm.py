"""``corpus_lm``: a language-modelling term on a plain-text corpus the user names (DistiLLM's and MiniLLM's
pre-training term, ``--lm-data-dir`` with ``--lm-coef``).

    L = mean over the block's tokens of [(1 - teacher_ratio) (-log q(x_t | x_<t)) + teacher_ratio H(p_t, q_t)]

with H(p, q) = -sum_v p(v) log q(v) the cross-entropy to the teacher's next-token distribution (MiniLLM's
pre-training term with ``--kd-ratio``: LMOps ``minillm/minillm/losses.py:198-226``; ``teacher_ratio: 0``, the
default, is DistiLLM's plain LM loss), on one block batch per micro-batch, added with the entry's weight (jongwooko/distillm ``finetune.py:341-343``:
``loss += args.lm_coef * pt_loss(...)``, one pre-training batch per training batch; ``pt_loss`` is the mean token
cross-entropy, ``finetune.py:162-168``). Token set ``batch``: each micro-batch's mean counts once, so the term is the
mean over the step's micro-batches, as the reference's data-parallel average of per-GPU means.

The corpus is a ``.jsonl`` file with a ``text`` field per line or a ``.txt`` file with one document per line. Its
documents are tokenized, joined with EOS and cut into blocks of ``max_length`` tokens (the reference's pre-training
data is pre-packed into 512-token blocks, ``tools/process_data_pretrain.py``; a short tail block is dropped and the
count reported). Blocks are visited in a seeded order, epoch after epoch; the position in that order is a buffer of
the module, so it is saved with the objective and a resumed run continues with the next block.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lmdistill.errors import ConfigError, DataError, Problem
from lmdistill.losses.functional import sft_loss
from lmdistill.losses.model_forward import forward_logits
from lmdistill.losses.term import Term, TermInputs
from lmdistill.losses.vocab import align_vocab
from lmdistill.runtime import rank_world


def read_corpus(path: Path) -> list[str]:
    """The documents of a ``.jsonl`` (``text`` field) or ``.txt`` (one per line) corpus; empty lines are skipped."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError([Problem(str(path), n, None, "expected a JSON object with a 'text' field")]) from None
                if not isinstance(text, str):
                    raise DataError([Problem(str(path), n, "text", "must be a string")])
                docs.append(text)
            else:
                docs.append(line.rstrip("\n"))
    if not docs:
        raise DataError([Problem(str(path), None, None, "the corpus has no documents")])
    return docs


class CorpusLMTerm(Term):
    """Cross-entropy on packed blocks of a text corpus: ``mean_t -log q(x_t)`` over a batch of blocks."""

    tokens = "batch"

    def __init__(self, *, data: str = "", max_length: int = 512, batch_size: int = 0, seed: int = 0,
                 teacher_ratio: float = 0.0):
        super().__init__()
        self.path, self.max_length, self.batch_size, self.seed = Path(data), max_length, batch_size, seed
        self.teacher_ratio = float(teacher_ratio)
        self.blocks: torch.Tensor | None = None
        self._order: tuple[int, list[int]] | None = None
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long))

    @classmethod
    def check_params(cls, params: dict, where: str) -> None:
        super().check_params(params, where)
        data = params.get("data", "")
        if not data:
            raise ConfigError(f"{where}: data: name the corpus (a .jsonl file with a 'text' field or a .txt file)")
        path = Path(str(data))
        if path.suffix not in (".jsonl", ".txt"):
            raise ConfigError(f"{where}: data: {path} must be a .jsonl or .txt file")
        if not path.is_file():
            raise ConfigError(f"{where}: data: {path} does not exist")
        ratio = params.get("teacher_ratio", 0.0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ConfigError(f"{where}: teacher_ratio must be in [0, 1], got {ratio!r}")
        for k, low in (("max_length", 2), ("batch_size", 0)):
            v = params.get(k, cls.param_names()[k])
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{where}: {k} must be an integer >= {low}, got {v!r}")

    @classmethod
    def reads_teacher(cls, params: dict) -> bool:
        return params.get("teacher_ratio", 0.0) > 0

    def load(self, tokenizer) -> None:
        docs = read_corpus(self.path)
        ids: list[int] = []
        for doc in tokenizer(docs, add_special_tokens=False)["input_ids"]:   # one batched call
            ids += doc + [tokenizer.eos_token_id]
        n = len(ids) // self.max_length
        if n == 0:
            raise DataError([Problem(str(self.path), None, None,
                                     f"{len(ids)} tokens, fewer than one block of max_length={self.max_length}")])
        self.blocks = torch.tensor(ids[: n * self.max_length]).view(n, self.max_length)
        dropped = len(ids) - n * self.max_length
        print(f"[lmdistill] corpus_lm: {self.path}: {len(docs)} documents -> {n} blocks of {self.max_length} tokens "
              f"(tail of {dropped} tokens dropped)")

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            idx = list(range(len(self.blocks)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
            self._order = (epoch, idx)
        return self._order[1]

    def next_batch(self, n: int) -> torch.Tensor:
        """The next ``n`` blocks of this process: with W processes, process r takes positions ``c + r n .. c + r n +
        n - 1`` of the global order and every process advances the cursor by ``W n`` (as a distributed sampler)."""
        rank, world = rank_world()
        start = int(self.cursor) + rank * n
        rows = []
        for c in range(start, start + n):
            epoch, pos = divmod(c, len(self.blocks))
            rows.append(self.order(epoch)[pos])
        self.cursor += n * world
        return self.blocks[rows]

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        if self.blocks is None:
            self.load(inputs.tokenizer)
        ids = self.next_batch(self.batch_size or len(inputs.rows) or 1).to(self.cursor.device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        logits = forward_logits(inputs.student, batch)[:, :-1]
        ce = sft_loss(logits, ids[:, 1:], torch.ones_like(ids[:, 1:]))
        if not self.teacher_ratio:
            return ce
        if inputs.teacher is None:
            raise ConfigError("corpus_lm: teacher_ratio > 0 needs a teacher model (teacher=...)")
        t_logits = inputs.teacher.logits(batch, None, whole=True)   # [B, T-1, V], no gradient
        s_logits, t_logits = align_vocab(logits, t_logits)
        dtype = torch.promote_types(s_logits.dtype, torch.float32)   # half precision computes in float32
        teacher_ce = -(t_logits.to(dtype).softmax(-1) * s_logits.to(dtype).log_softmax(-1)).sum(-1).mean()
        return (1 - self.teacher_ratio) * ce + self.teacher_ratio * teacher_ce
