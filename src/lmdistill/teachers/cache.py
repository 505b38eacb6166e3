"""The offline teacher cache: top-k log-probabilities of a teacher at every trained position of a dataset.

Layout of a cache folder::

    manifest.json        what it was captured from (teacher fingerprint, tokenizer hash, template, lengths, K,
                         temperature, data hash), ``shard_files`` (each shard's size, SHA-256, row range and first
                         and last row id, added as each shard is written) and, once complete, the totals (rows,
                         tokens, bytes per token)
    shard-00000.npz ...  ``shard_rows`` rows each, written atomically (a shard is whole or absent)

A shard holds, for its rows in capture order: ``keys`` (each row's :func:`~.fingerprint.row_key`), ``lengths``
(trained positions per row) and, over all their positions, ``ids`` (the top-k token ids, sorted ascending and stored
as differences to the previous id of the position: small numbers, which compress well), ``logprobs`` (in the same
order, float16 or float32) and ``rest`` (log of the mass outside the top k, float32). Arrays are zlib-compressed
(``numpy.savez_compressed``).

``TeacherCache(dir)`` reads it: opening checks every shard's size against the manifest and indexes every row key;
a shard is decoded on demand (a bounded LRU) from bytes whose SHA-256 matched the manifest; ``top_k(rows,
batch)`` gives a :class:`~lmdistill.losses.sparse.SparseTeacher` for a training micro-batch. A damaged shard
(truncated, changed, missing, unreadable) is a :class:`DamagedCacheError` naming the shard, the rows it holds and the
``lmdistill capture`` command that rewrites it (:mod:`.shards`).
"""

from __future__ import annotations

import io
import json
import warnings
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lmdistill.errors import ConfigError
from lmdistill.io import atomic_open, write_json
from lmdistill.losses.sparse import SparseTeacher
from lmdistill.teachers.base import Capabilities, Teacher
from lmdistill.teachers.fingerprint import row_key
from lmdistill.teachers.shards import (DamagedCacheError, check_size, damaged_error, entry_problem, shard_entries,
                                       shard_entry, unreadable)

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


def write_shard(path: Path, keys: list[str], parts: list[SparseTeacher], vocab: int, logprob_dtype: str, *,
                first_row: int = 0, ids: tuple[str, str] = ("", "")) -> dict:
    """Write one shard atomically; returns its manifest entry (size, SHA-256 of the bytes written, rows, ids)."""
    top = torch.cat([p.ids for p in parts]).cpu()
    lps = torch.cat([p.logprobs for p in parts]).cpu()
    order = top.argsort(dim=1)
    top, lps = top.gather(1, order).numpy(), lps.gather(1, order).float().numpy()
    rest = torch.cat([p.rest for p in parts]).float().cpu().numpy()
    buf = io.BytesIO()
    np.savez_compressed(buf, keys=np.array(keys), lengths=np.array([len(p) for p in parts], dtype=np.int64),
                        ids=encode_ids(top, vocab), logprobs=lps.astype(logprob_dtype), rest=rest)
    data = buf.getvalue()
    with atomic_open(path, "wb") as f:
        f.write(data)
    return shard_entry(path.name, data, first_row, len(keys), ids)


def read_shard_arrays(source: bytes | Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named arrays of a shard (its bytes, or its file: then only those arrays are read); any failure to decode
    them (a bad zip, a bad CRC, a missing or malformed array) is re-raised as ``ValueError`` with what the decoder
    said."""
    try:
        with np.load(io.BytesIO(source) if isinstance(source, bytes) else source) as z:
            return {k: z[k] for k in names}
    except Exception as e:   # zipfile.BadZipFile, zlib.error, KeyError, EOFError, ValueError: the bytes are bad
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        raise ValueError(f"{kind}: {e}") from None


def read_manifest(root: Path, fmt: str = FORMAT, *, what: str = "teacher-cache",
                  instead: str = "remove the folder and capture again") -> dict | None:
    """``root``'s manifest of format ``fmt`` (None when there is none); anything else is refused naming the file,
    what it should have been (``what``) and what to do (``instead``)."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not a {what} manifest ({e}); {instead}") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != fmt:
        raise ConfigError(f"{path}: not a {what} manifest (format {found!r}, expected {fmt!r}); {instead}")
    return manifest


def mismatches(manifest: dict, spec: dict) -> list[str]:
    """``field: cache X, here Y`` for every spec field the two disagree on."""
    return [f"{k}: cache {manifest.get(k)!r}, here {spec[k]!r}" for k in SPEC_FIELDS
            if k in spec and manifest.get(k) != spec[k]]


def write_manifest(root: Path, manifest: dict) -> None:
    write_json(root / MANIFEST, {"format": FORMAT, **manifest})


def cache_dir(spec: str) -> str:
    """The folder of a ``cache:DIR`` teacher value."""
    return spec.strip()[len("cache:"):]


#: A cache gives the top-k of the rows it captured, at its capture temperature (set when it opens).
CACHE_CAPABILITIES = Capabilities(top_k=True, new_sequences=False)


class TeacherCache(Teacher):
    """A captured cache, opened for training: ``top_k(rows, batch)`` per micro-batch (the rows it captured only,
    at the temperature it was captured at).

    Opening checks that every shard the manifest lists is there with its recorded size, and reads each shard's row
    keys; each read of a shard's arrays checks its SHA-256 first. ``max_decoded_shards`` bounds the decoded shards
    kept in memory (least recently used first out). A cache captured before shards had checksums is read with a
    warning (its damage is found only when a shard cannot be decoded); rerunning its ``lmdistill capture`` command
    adds them without recomputing anything.
    """

    kind = "cache"
    prefix = "cache:"
    capabilities = CACHE_CAPABILITIES

    @classmethod
    def check_spec_text(cls, spec: str) -> None:
        if not spec[len(cls.prefix):]:
            raise ConfigError("teacher: cache: needs a folder, e.g. teacher=cache:runs/teacher-cache")

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
        self.capabilities = replace(CACHE_CAPABILITIES, temperatures=(self.temperature,))
        self.vocab = int(manifest["vocab"])
        self.entries = shard_entries(manifest, self.root)   # None: a cache from before shard checksums
        if self.entries is None:
            warnings.warn(f"teacher: cache:{root} has no shard checksums (captured by an earlier lmdistill): damage "
                          "is found only when a shard cannot be decoded; rerun its `lmdistill capture` command to "
                          "add them (nothing is recomputed)", UserWarning, stacklevel=2)
        n_shards = int(manifest["shards"])
        bad = [(s, check_size(shard_path(self.root, s), self.entries[s] if self.entries else None))
               for s in range(n_shards)]
        bad = [(s, why) for s, why in bad if why]
        if bad:
            raise damaged_error(self.root, manifest, bad)
        self.index: dict[str, tuple[int, int, int]] = {}   # key -> (shard, first position, length)
        for s in range(n_shards):
            z = self._read(s, ("keys", "lengths"), verify=False)   # the full check comes when its scores are read
            offsets = np.concatenate([[0], np.cumsum(z["lengths"])[:-1]])
            for key, off, n in zip(z["keys"].tolist(), offsets.tolist(), z["lengths"].tolist()):
                self.index.setdefault(key, (s, off, n))
        self._decoded: OrderedDict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self.max_decoded = max(1, int(max_decoded_shards))

    @classmethod
    def open(cls, spec: str, *, expect=None, **_) -> "TeacherCache":
        """``cache:DIR`` opened, refused when ``expect(manifest)`` (this run's tokenizer hash, template, lengths,
        data hash) differs from what it was captured with."""
        cache = cls(cache_dir(spec))
        if expect is not None:
            cache.check_compatible(expect(cache.manifest))
        return cache

    def __len__(self) -> int:
        return len(self.index)

    def check_compatible(self, spec: dict, where: str = "teacher") -> None:
        """Refuse a cache captured with another tokenizer, template, lengths or data than this run's."""
        bad = mismatches(self.manifest, spec)
        if bad:
            raise ConfigError(f"{where}: cache:{self.root} was captured with other settings than this run "
                              f"({'; '.join(bad)}); capture again with this run's settings")

    def _read(self, s: int, names: tuple[str, ...], verify: bool = True) -> dict[str, np.ndarray]:
        """Arrays of shard ``s``: with ``verify`` decoded from bytes whose size and SHA-256 match the manifest, else
        read lazily from the file (only those arrays); a damaged shard raises :class:`DamagedCacheError`."""
        path = shard_path(self.root, s)
        entry = self.entries[s] if self.entries else None
        try:
            if not verify:
                return read_shard_arrays(path, names)
            data = path.read_bytes()
            why = entry_problem(data, entry)
            if why is None:
                return read_shard_arrays(data, names)
        except OSError as e:
            why = f"cannot be read ({e.strerror or e})"
        except ValueError as e:   # undecodable: say first whether its bytes are not the ones captured
            try:
                why = entry_problem(path.read_bytes(), entry) or unreadable(e)
            except OSError:
                why = unreadable(e)
        raise damaged_error(self.root, self.manifest, [(s, why)])

    def _shard(self, s: int):
        if s in self._decoded:
            self._decoded.move_to_end(s)
            return self._decoded[s]
        z = self._read(s, ("ids", "logprobs", "rest"))
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

    def top_k(self, rows, batch: dict) -> SparseTeacher:
        """The teacher's sparse distributions at the trained positions of ``batch`` (row-major), one row each."""
        parts = [self.row(r.input_ids, r.loss_mask, r.id) for r in rows]
        expected = int(batch["loss_mask"][:, 1:].sum())
        got = sum(len(p) for p in parts)
        if got != expected:
            raise ConfigError(f"teacher: cache:{self.root} has {got} positions for this batch, the batch trains "
                              f"{expected}")
        return SparseTeacher.concat(parts)


__all__ = ["DamagedCacheError", "MANIFEST", "SPEC_FIELDS", "TeacherCache", "read_manifest", "write_manifest",
           "write_shard"]
