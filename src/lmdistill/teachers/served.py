"""A teacher on an OpenAI-compatible server (vLLM, ``lmdistill serve``): top-k log-probabilities of given sequences.

``teacher: openai:NAME@URL`` in a recipe. For each training sequence the server is asked for the log-probabilities
of every token given the ones before it (the completions API: ``echo`` with ``logprobs``, or vLLM's
``prompt_logprobs``), with the sequence sent as token ids, so no text is re-tokenized. The top ``top_k`` entries at
each trained position become a :class:`~lmdistill.losses.sparse.SparseTeacher` (the tail bucket is the mass the
server did not list). Requests go through the clients' retry policy; answers are appended to a crash-safe response
cache (``teacher_scores.jsonl`` in the run folder), so a resumed run asks only for what it has not seen.

On-policy distillation (``opd``) asks only for each sampled token's own log-probability (``token_logprobs``: no
top-k travels). SCRG scores the student's whole responses with it (``sequence_scores``;
``generation/policies/scrg.py``). Methods that need the teacher's own tokens while generating (SWITCH, the teacher's
samples, MiniLLM's mixed sampling) need a local teacher; ``TrainConfig.check`` refuses them with a served teacher.
"""

from __future__ import annotations

import math

import torch

from lmdistill.clients.cache import ResponseCache, request_key
from lmdistill.clients.chat import OpenAIChatClient, parse_openai_spec
from lmdistill.errors import ConfigError
from lmdistill.losses.sparse import SparseTeacher
from lmdistill.teachers.base import Capabilities, Teacher

LOGPROB_APIS = ("echo", "prompt_logprobs")


def top_k_rows(positions: list[dict[int, float] | None], wanted: list[int], top_k: int) -> tuple[list, list]:
    """Ids and log-probabilities ``[len(wanted), top_k]`` of the positions ``wanted``; a position with fewer than
    ``top_k`` entries is padded with unused ids at log-probability ``-inf`` (they join the student's listed bins)."""
    ids, lps = [], []
    for t in wanted:
        entry = positions[t] if t < len(positions) else None
        if not entry:
            raise ConfigError(f"served teacher: no log-probabilities for position {t}")
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:top_k]
        row_ids = [int(i) for i, _ in best]
        row_lps = [float(lp) for _, lp in best]
        pad = 0
        taken = set(row_ids)
        while len(row_ids) < top_k:
            if pad not in taken:
                row_ids.append(pad)
                row_lps.append(float("-inf"))
            pad += 1
        ids.append(row_ids)
        lps.append(row_lps)
    return ids, lps


def tail_log_mass(lps: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum exp(lps))`` per row; ``-inf`` where the listed entries hold all the mass.

    A server computes its log-probabilities in float32 (or less): K of them sum to 1 only to about ``K * 2**-23``,
    so a remainder within that rounding is no mass at all (else a top-k covering the vocabulary would leave a
    spurious tail bucket of ~1e-7 that the sparse losses weigh against the student's near-empty one)."""
    rest = 1.0 - lps.double().exp().sum(-1)
    rounding = max(lps.shape[-1], 1) * 2.0 ** -23
    return torch.where(rest > rounding, rest.clamp(min=1e-300).log(), torch.full_like(rest, -math.inf)).float()


class ServedTeacher(Teacher):
    """Scores of training sequences from a server: ``top_k(rows, batch)`` as :class:`TeacherCache` has, and
    ``sequence_scores`` of any token lists (SCRG's error positions). Log-probabilities at temperature 1."""

    kind = "served"
    prefix = "openai:"
    capabilities = Capabilities(top_k=True, sequence_scores=True, token_logprobs=True, temperatures=(1.0,))

    @classmethod
    def check_spec_text(cls, spec: str) -> None:
        name, sep, url = spec[len(cls.prefix):].rpartition("@")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ConfigError(f"teacher: {spec!r} should be openai:MODEL@BASE_URL, "
                              "e.g. openai:teacher@http://127.0.0.1:8000/v1")

    def __init__(self, client, *, top_k: int = 20, api: str = "echo", cache: ResponseCache | None = None):
        if api not in LOGPROB_APIS:
            raise ConfigError(f"teacher_logprobs_api: must be one of {', '.join(LOGPROB_APIS)}, got {api!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"teacher_top_k: must be a positive integer, got {top_k!r}")
        self.client, self.k, self.api, self.cache = client, top_k, api, cache   # k: entries per position
        self.requests = 0
        self.temperature = 1.0
        self.vocab = None   # the server's vocabulary is not known here: SCRG checks the listed ids against its own

    @classmethod
    def from_spec(cls, spec: str, *, top_k: int, api: str, cache_path=None, tokenizer=None, **client_kwargs):
        model, url = parse_openai_spec(spec)
        client = OpenAIChatClient(model, url, **client_kwargs)
        return cls(client, top_k=top_k, api=api, cache=ResponseCache(cache_path) if cache_path else None)

    @classmethod
    def open(cls, spec: str, *, top_k: int = 20, api: str = "echo", cache_path=None, tokenizer=None, **_):
        return cls.from_spec(spec, top_k=top_k, api=api, cache_path=cache_path, tokenizer=tokenizer)

    def _key(self, ids: list[int]) -> str:
        return request_key(self.client.name, [], {"token_ids": ids, "top_k": self.k, "api": self.api})

    def _score(self, seqs: list[list[int]], wanted: list[list[int]]) -> list[tuple[list, list]]:
        out: list = [None] * len(seqs)
        missing = []
        for i, ids in enumerate(seqs):
            if not wanted[i]:
                out[i] = ([], [])
                continue
            row = self.cache.get(self._key(ids)) if self.cache is not None else None
            # a row scored at other positions (SCRG from a correction on, training at the loss positions) is asked
            # again; rows written before positions were recorded are matched by count
            if row is not None and row.get("pos", wanted[i]) == wanted[i] and len(row["ids"]) == len(wanted[i]):
                out[i] = (row["ids"], row["lps"])
            else:
                missing.append(i)
        if missing:
            answers = self.client.prompt_logprobs_many([seqs[i] for i in missing], self.k, api=self.api)
            self.requests += len(missing)
            for i, positions in zip(missing, answers):
                ids, lps = top_k_rows(positions, wanted[i], self.k)
                out[i] = (ids, lps)
                if self.cache is not None:
                    self.cache.put({"key": self._key(seqs[i]), "ids": ids, "pos": wanted[i],
                                    "lps": [[lp if math.isfinite(lp) else -1e30 for lp in r] for r in lps]})
        return out

    def sequence_scores(self, seqs: list[list[int]], wanted: list[list[int]]) -> SparseTeacher:
        """The top-k of token ``t`` given ``seq[:t]`` for every ``t`` of ``wanted[i]`` of each ``seqs[i]``, as one
        :class:`SparseTeacher` over the positions in row-major order (rows with no position are not sent)."""
        scored = self._score([list(s) for s in seqs], wanted)
        ids = torch.tensor([i for s in scored for i in s[0]], dtype=torch.long).reshape(-1, self.k)
        lps = torch.tensor([lp for s in scored for lp in s[1]], dtype=torch.float32).reshape(-1, self.k)
        lps = torch.where(lps <= -1e29, torch.full_like(lps, -math.inf), lps)
        return SparseTeacher(ids, lps, tail_log_mass(lps), self.temperature, self.vocab)

    def top_k(self, rows, batch: dict) -> SparseTeacher:
        wanted = [[t for t in range(1, len(r.loss_mask)) if r.loss_mask[t]] for r in rows]
        sparse = self.sequence_scores([list(r.input_ids) for r in rows], wanted)
        expected = int(batch["loss_mask"][:, 1:].sum())
        if len(sparse) != expected:
            raise ConfigError(f"served teacher: {len(sparse)} scored positions for a batch that trains {expected}")
        return sparse

    def token_logprobs(self, rows, batch: dict) -> torch.Tensor:
        """``[N]`` log-probabilities of each trained token given the tokens before it (row-major), float32: the server
        is asked for those alone (``echo`` with ``logprobs: 0``, or ``prompt_logprobs: 0``), never a top-k."""
        seqs = [list(r.input_ids) for r in rows]
        wanted = [[t for t in range(1, len(r.loss_mask)) if r.loss_mask[t]] for r in rows]
        keys = [request_key(self.client.name, [], {"token_ids": ids, "token_logprobs": True, "api": self.api})
                for ids in seqs]
        out: list = [None] * len(rows)
        missing = []
        for i in range(len(rows)):
            row = self.cache.get(keys[i]) if self.cache is not None and wanted[i] else None
            if not wanted[i] or (row is not None and row.get("pos") == wanted[i]):
                out[i] = row["tlp"] if wanted[i] else []
            else:
                missing.append(i)
        if missing:
            answers = self.client.token_logprobs_many([seqs[i] for i in missing], api=self.api)
            self.requests += len(missing)
            for i, scores in zip(missing, answers):
                out[i] = [scores[t] for t in wanted[i]]
                if self.cache is not None:
                    self.cache.put({"key": keys[i], "pos": wanted[i], "tlp": out[i]})
        lps = torch.tensor([lp for row in out for lp in row], dtype=torch.float32)
        expected = int(batch["loss_mask"][:, 1:].sum())
        if len(lps) != expected:
            raise ConfigError(f"served teacher: {len(lps)} scored tokens for a batch that trains {expected}")
        return lps

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.client.close()
