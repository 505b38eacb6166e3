"""The offline teacher cache: top-k log-probabilities of a teacher at every trained position of a dataset.

Layout of a cache folder::

    manifest.json        what it was captured from (teacher fingerprint, tokenizer hash, template, lengths, K,
                         temperature, data hash) and, once complete, the totals (rows, tokens, bytes per token)
    shard-00000.npz ...  ``shard_rows`` rows each, written atomically (a shard is whole or absent)

A shard holds, for its rows in capture order: ``keys`` (each row's :func:`~.fingerprint.row_key`), ``lengths``
(trained positions per row) and, over all their positions, ``ids`` (the top-k token ids, sorted ascending and stored
as differences to the previous id of the position: small numbers, which compress well), ``logprobs`` (in the same
order, float16 or float32) and ``rest`` (log of the mass outside the top k, float32). Arrays are zlib-compressed
(``numpy.savez_compressed``).

``TeacherCache(dir)`` reads it: an index of every row key, shards decoded on demand (a bounded LRU), and
``sparse_scores(rows, batch)`` giving a :class:`~lmdistill.losses.sparse.SparseTeacher` for a training micro-batch.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from lmdistill.errors import ConfigError
from lmdistill.io import atomic_open, write_json
from lmdistill.losses.sparse import SparseTeacher
from lmdistill.teachers.fingerprint import row_key

MANIFEST = "manifest.json"
FORMAT = "lmdistill-teacher-cache/1"
#: Manifest fields that must agree between a cache and the run that reads or extends it.
SPEC_FIELDS = ("teacher_fingerprint", "tokenizer_hash", "template", "max_prompt_length", "max_length", "top_k",
               "temperature", "data_hash", "logprob_dtype", "shard_rows", "vocab")


def shard_path(root: Path, index: int) -> Path:
    return root / f"shard-{index:05d}.npz"


def encode_ids(ids: np.ndarray, vocab: int) -> np.ndarray:
    """Sorted ids ``[N, K]`` as differences along each row (the first entry is the id itself)."""
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    return np.diff(ids, axis=1, prepend=0).astype(dtype)


def decode_ids(deltas: np.ndarray) -> np.ndarray:
    return np.cumsum(deltas.astype(np.int64), axis=1)


def write_shard(path: Path, keys: list[str], parts: list[SparseTeacher], vocab: int, logprob_dtype: str) -> int:
    """Write one shard atomically; returns its size in bytes."""
    ids = torch.cat([p.ids for p in parts]).cpu()
    lps = torch.cat([p.logprobs for p in parts]).cpu()
    order = ids.argsort(dim=1)
    ids, lps = ids.gather(1, order).numpy(), lps.gather(1, order).float().numpy()
    rest = torch.cat([p.rest for p in parts]).float().cpu().numpy()
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, keys=np.array(keys), lengths=np.array([len(p) for p in parts], dtype=np.int64),
                            ids=encode_ids(ids, vocab), logprobs=lps.astype(logprob_dtype), rest=rest)
    return path.stat().st_size


def read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not a teacher-cache manifest ({e}); remove the folder and capture again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a teacher-cache manifest (format {manifest.get('format')!r}, "
                          f"expected {FORMAT!r})")
    return manifest


def mismatches(manifest: dict, spec: dict) -> list[str]:
    """``field: cache X, here Y`` for every spec field the two disagree on."""
    return [f"{k}: cache {manifest.get(k)!r}, here {spec[k]!r}" for k in SPEC_FIELDS
            if k in spec and manifest.get(k) != spec[k]]


def write_manifest(root: Path, manifest: dict) -> None:
    write_json(root / MANIFEST, {"format": FORMAT, **manifest})


class TeacherCache:
    """A captured cache, opened for training: ``sparse_scores(rows, batch)`` per micro-batch.

    ``max_decoded_shards`` bounds the decoded shards kept in memory (least recently used first out).
    """

    def __init__(self, root: str | Path, *, max_decoded_shards: int = 32):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"teacher: cache:{root}: no such folder (capture one with `lmdistill capture`)")
        manifest = read_manifest(self.root)
        if manifest is None:
            raise ConfigError(f"teacher: cache:{root}: no {MANIFEST}; is it a folder written by `lmdistill capture`?")
        if not manifest.get("complete"):
            raise ConfigError(f"teacher: cache:{root}: the capture did not finish ({manifest.get('shards_done', 0)} "
                              f"of {manifest.get('shards', '?')} shards); rerun the same `lmdistill capture` command "
                              "to complete it")
        self.manifest = manifest
        self.temperature = float(manifest["temperature"])
        self.vocab = int(manifest["vocab"])
        self.index: dict[str, tuple[int, int, int]] = {}   # key -> (shard, first position, length)
        for s in range(int(manifest["shards"])):
            path = shard_path(self.root, s)
            if not path.exists():
                raise ConfigError(f"teacher: cache:{root}: {path.name} is missing; capture again into this folder "
                                  "(the missing shards are recomputed)")
            with np.load(path) as z:
                keys, lengths = z["keys"], z["lengths"]
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            for key, off, n in zip(keys.tolist(), offsets.tolist(), lengths.tolist()):
                self.index.setdefault(key, (s, off, n))
        self._decoded: OrderedDict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self.max_decoded = max(1, int(max_decoded_shards))

    def __len__(self) -> int:
        return len(self.index)

    def check_compatible(self, spec: dict, where: str = "teacher") -> None:
        """Refuse a cache captured with another tokenizer, template, lengths or data than this run's."""
        bad = mismatches(self.manifest, spec)
        if bad:
            raise ConfigError(f"{where}: cache:{self.root} was captured with other settings than this run "
                              f"({'; '.join(bad)}); capture again with this run's settings")

    def _shard(self, s: int):
        if s in self._decoded:
            self._decoded.move_to_end(s)
            return self._decoded[s]
        with np.load(shard_path(self.root, s)) as z:
            ids = torch.from_numpy(decode_ids(z["ids"]).astype(np.int32))   # int32 in memory, long per row
            lps = torch.from_numpy(z["logprobs"].astype(np.float32))
            rest = torch.from_numpy(z["rest"])
        self._decoded[s] = (ids, lps, rest)
        if len(self._decoded) > self.max_decoded:
            self._decoded.popitem(last=False)
        return self._decoded[s]

    def row(self, input_ids: list[int], loss_mask: list[int], row_id: str = "?") -> SparseTeacher:
        key = row_key(input_ids, loss_mask)
        hit = self.index.get(key)
        if hit is None:
            raise ConfigError(
                f"teacher: row {row_id!r} is not in cache:{self.root} ({len(self.index)} rows captured"
                f"{', with --limit ' + str(self.manifest['limit']) if self.manifest.get('limit') else ''}); "
                "train on the captured rows (max_train_examples) or capture this data")
        s, off, n = hit
        ids, lps, rest = self._shard(s)
        return SparseTeacher(ids[off:off + n].long(), lps[off:off + n], rest[off:off + n], self.temperature, self.vocab)

    def sparse_scores(self, rows, batch: dict) -> SparseTeacher:
        """The teacher's sparse distributions at the trained positions of ``batch`` (row-major), one row each."""
        parts = [self.row(r.input_ids, r.loss_mask, r.id) for r in rows]
        expected = int(batch["loss_mask"][:, 1:].sum())
        got = sum(len(p) for p in parts)
        if got != expected:
            raise ConfigError(f"teacher: cache:{self.root} has {got} positions for this batch, the batch trains "
                              f"{expected}")
        return SparseTeacher.concat(parts)
