"""A cross-tokenizer cache, read for training: ``teacher: xtok:cache:DIR`` (written by ``lmdistill capture --student
S``, ``cross_capture.py``).

Layout: ``manifest.json`` (format ``lmdistill-xtok-cache/1``: what it was captured from, as a same-tokenizer cache's,
plus the teacher's template, and each shard's size and SHA-256), ``teacher_tokenizer/`` (the teacher's tokenizer) and
``shard-NNNNN.npz`` holding, for its rows in capture order: ``keys`` (the student row's
:func:`~.fingerprint.row_key`: the student's ids and loss mask, so a run finds its rows), ``lengths`` (the teacher's
response tokens per row) and, over those tokens, ``ids`` (the teacher's tokens of the response), ``ends`` (each
one's end byte in the response text), ``top_ids`` / ``top_lps`` (its top-k log-probabilities there), ``rest`` (log of
the mass outside the top k) and ``own`` (the log-probability of its own token). Training recomputes the student's
byte ends from its tokens and groups them with the stored ends (``byte_align.align``).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from lmdistill.errors import ConfigError
from lmdistill.losses.sparse import SparseTeacher
from lmdistill.models import load_tokenizer
from lmdistill.teachers.byte_align import align, one_to_one_bytes, student_text
from lmdistill.teachers.cache import cache_dir, read_manifest as read_cache_manifest
from lmdistill.teachers.cross_rows import Source, TeacherRow, Tokenizers
from lmdistill.teachers.fingerprint import row_key
from lmdistill.teachers.shards import entry_problem

FORMAT = "lmdistill-xtok-cache/1"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "teacher_tokenizer"
#: Manifest fields a run (``expect``) or a resumed capture must agree with.
SPEC_FIELDS = ("teacher_fingerprint", "tokenizer_hash", "template", "teacher_template", "max_prompt_length",
               "max_length", "top_k", "temperature", "data_hash", "logprob_dtype", "shard_rows", "vocab")
ARRAYS = ("keys", "lengths", "ids", "ends", "top_ids", "top_lps", "rest", "own")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def read_manifest(root: Path) -> dict | None:
    """A cross-tokenizer cache's manifest (``teachers.cache.read_manifest`` with this format)."""
    return read_cache_manifest(root, FORMAT, what="cross-tokenizer cache",
                               instead="a same-tokenizer cache is read as teacher=cache:DIR")


def decode_shard(data: bytes, where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data)) as z:
            return {k: z[k] for k in ARRAYS}
    except Exception as e:   # a bad zip, CRC, missing array: the bytes are bad
        raise ConfigError(f"{where}: cannot be decoded ({type(e).__name__}: {e}); rerun its capture command") from None


class CacheSource(Source):
    """The scores a capture stored: the teacher's tokens, byte ends, top-k and own log-probabilities per row."""

    dense = False

    def __init__(self, root: Path, manifest: dict, max_decoded: int = 8):
        self.root, self.manifest = root, manifest
        self.vocab, self.temperature = int(manifest["vocab"]), float(manifest["temperature"])
        self.entries = manifest.get("shard_files") or []
        self.index: dict[str, tuple[int, int, int]] = {}
        self._decoded: OrderedDict[int, dict] = OrderedDict()
        self.max_decoded = max_decoded
        for s in range(int(manifest["shards"])):
            z = self._shard(s)
            offsets = np.concatenate([[0], np.cumsum(z["lengths"])[:-1]]).astype(np.int64)
            for key, off, n in zip(z["keys"].tolist(), offsets.tolist(), z["lengths"].tolist()):
                self.index.setdefault(key, (s, off, n))

    @classmethod
    def open(cls, inner: str, student_tokenizer, expect=None) -> tuple["CacheSource", object, str]:
        """``(source, teacher tokenizer, teacher template)`` of ``cache:DIR``, refused when ``expect(manifest)``
        (the run's student tokenizer hash, template, lengths, data hash) differs from what it was captured with."""
        root = Path(cache_dir(inner))
        manifest = read_manifest(root) if root.is_dir() else None
        if manifest is None:
            raise ConfigError(f"teacher: xtok:{inner}: no cross-tokenizer cache there (capture one with `lmdistill "
                              "capture --teacher T --student S --data D --out DIR`)")
        if not manifest.get("complete"):
            raise ConfigError(f"teacher: xtok:{inner}: the capture did not finish; rerun the same `lmdistill capture`")
        if expect is not None:
            want = expect(manifest)
            bad = [f"{k}: cache {manifest.get(k)!r}, here {v!r}" for k, v in want.items() if manifest.get(k) != v]
            if bad:
                raise ConfigError(f"teacher: xtok:{inner} was captured with other settings than this run "
                                  f"({'; '.join(bad)}); capture again with this run's settings")
        return cls(root, manifest), load_tokenizer(str(root / TOKENIZER_DIR)), manifest["teacher_template"]

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s in self._decoded:
            self._decoded.move_to_end(s)
            return self._decoded[s]
        path = self.root / shard_name(s)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror or e}); rerun its capture command") from None
        why = entry_problem(data, self.entries[s] if s < len(self.entries) else None)
        if why:
            raise ConfigError(f"{path} {why}; rerun its capture command (damaged shards are rewritten)")
        self._decoded[s] = decode_shard(data, str(path))
        if len(self._decoded) > self.max_decoded:
            self._decoded.popitem(last=False)
        return self._decoded[s]

    def rows(self, rows, tokenizers: Tokenizers) -> list[TeacherRow]:
        out = []
        for r in rows:
            hit = self.index.get(row_key(r.input_ids, r.loss_mask))
            if hit is None:
                raise ConfigError(f"teacher: row {r.id!r} is not in xtok:cache:{self.root} ({len(self.index)} rows "
                                  "captured); train on the captured rows or capture this data")
            s, off, n = hit
            z = self._shard(s)
            ids, ends = z["ids"][off:off + n].tolist(), z["ends"][off:off + n].tolist()
            _, s_ends = student_text([tokenizers.student_bytes(t) for t in r.response_ids])
            groups = align(s_ends, ends)
            one, total = one_to_one_bytes(groups, s_ends)
            out.append(TeacherRow([], ids, ends, groups, len(r.response_ids), one, total, ref=hit))
        return out

    def score(self, trows: list[TeacherRow]):
        parts = [(self._shard(s), off, n) for s, off, n in (r.ref for r in trows)]
        cat = {k: np.concatenate([z[k][off:off + n] for z, off, n in parts]) for k in ("top_ids", "top_lps", "rest",
                                                                                     "own")}
        sparse = SparseTeacher(torch.from_numpy(cat["top_ids"].astype(np.int64)),
                               torch.from_numpy(cat["top_lps"].astype(np.float32)),
                               torch.from_numpy(cat["rest"].astype(np.float32)), self.temperature, self.vocab)
        return None, sparse, torch.from_numpy(cat["own"].astype(np.float32))
