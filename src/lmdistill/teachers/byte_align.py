"""Where each token of a text starts and ends in the text's UTF-8 bytes, and the n:m groups of two tokenizations.

**Token bytes** (:class:`TokenBytes`): sampled ids come without a text offset map, so each token's bytes are read off
its tokenizer's vocabulary: a byte-level BPE spelling through GPT-2's byte alphabet (``decoding/token_text.py``), a
SentencePiece piece with ``▁`` as the space and ``<0xNN>`` byte-fallback pieces as the byte NN, an added token as its
content, any other token as its decoded text. Special tokens (EOS, BOS, PAD, chat markers) stand for no text: zero
bytes. A token's end offset is the prefix sum of the bytes so far.

**The student's text** (:func:`student_text`): the concatenation of its tokens' bytes. Sampled tokens may leave
invalid UTF-8 (half a character, a stray byte); then the text the teacher reads has U+FFFD where the decoder put it
and each student token ends where the incremental decoder stood after it (so both sides count bytes of one text).

**The teacher's ends** (:func:`teacher_ends`): from its token bytes when they spell the text exactly, else from the
fast tokenizer's character offsets (normalizers that change the text), mapped to bytes.

**Groups** (:func:`align`): TRL GOLD's walk (``trl/experimental/gold/gold_trainer.py:530``,
``_align_by_byte_offsets``): advance the side whose current token ends earlier; where both end at the same byte, a
group closes. Each group is ``(s0, s1, t0, t1)``, token ranges of the two sides covering the same bytes; a trailing
group with an empty side (a zero-width token only one side has) is dropped, as TRL drops it. Both sides' EOS (zero
width, after the last byte) form the last group, one to one.

**Vocabulary matches** (:func:`matched_ids`): the token ids whose text is the same in both vocabularies (GOLD's
exact-match set). TRL compares the vocabularies' spellings (``get_vocab()`` keys, ``gold_trainer.py:350``), which
never match between a byte-level (``Ġthe``) and a SentencePiece (``▁the``) vocabulary; here tokens match on the
bytes they stand for, special tokens on their content (EOS with EOS), duplicates paired in id order (so identical
tokenizers match every id to itself).
"""

from __future__ import annotations

import codecs
import json
import re

from lmdistill.decoding.token_text import BYTE_DECODER
from lmdistill.errors import ConfigError

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _has_type(node, name: str, pattern: str | None = None) -> bool:
    """Whether a tokenizers-library component tree (JSON) holds a component of type ``name`` (with ``pattern``)."""
    if isinstance(node, dict):
        if node.get("type") == name and (pattern is None or (node.get("pattern") or {}).get("String") == pattern):
            return True
        return any(_has_type(v, name, pattern) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name, pattern) for v in node)
    return False


class TokenBytes:
    """``token_bytes(id) -> bytes``: the UTF-8 bytes token ``id`` stands for in a text (module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = json.loads(backend.to_str()) if backend is not None else {}
        decoder, model = spec.get("decoder"), spec.get("model") or {}
        self.byte_level = _has_type(decoder, "ByteLevel")
        self.metaspace = _has_type(decoder, "Metaspace") or _has_type(decoder, "Replace", "▁")
        self.byte_fallback = bool(model.get("byte_fallback")) or _has_type(decoder, "ByteFallback")
        self.special = set(getattr(tokenizer, "all_special_ids", None) or [])
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.added = {i: t.content for i, t in added.items() if i not in self.special}
        self._memo: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        raw = self._memo.get(token)
        if raw is None:
            raw = self._memo[token] = self._bytes(int(token))
        return raw

    def _bytes(self, token: int) -> bytes:
        if token in self.special:
            return b""
        if token in self.added:
            return self.added[token].encode("utf-8")
        spelled = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(spelled, str):
            if self.byte_level and all(c in BYTE_DECODER for c in spelled):
                return bytes(BYTE_DECODER[c] for c in spelled)
            if self.metaspace:
                hit = _BYTE_PIECE.fullmatch(spelled) if self.byte_fallback else None
                return bytes([int(hit.group(1), 16)]) if hit else spelled.replace("▁", " ").encode("utf-8")
        return self.tokenizer.decode([token]).encode("utf-8")

    def is_special(self, token: int) -> bool:
        return int(token) in self.special


def prefix_ends(chunks: list[bytes]) -> list[int]:
    """The end offset of each chunk in their concatenation."""
    out, n = [], 0
    for c in chunks:
        n += len(c)
        out.append(n)
    return out


def student_text(chunks: list[bytes]) -> tuple[str, list[int]]:
    """The text the student's tokens (their ``chunks`` of bytes) spell, and each token's end in its UTF-8 bytes."""
    raw = b"".join(chunks)
    try:
        return raw.decode("utf-8"), prefix_ends(chunks)
    except UnicodeDecodeError:
        pass
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pieces, ends, n = [], [], 0
    for c in chunks:
        piece = decoder.decode(c)
        pieces.append(piece)
        n += len(piece.encode("utf-8"))
        ends.append(n)
    rest = decoder.decode(b"", final=True)   # an unfinished character at the very end: the last token with bytes
    if rest:
        pieces.append(rest)
        n += len(rest.encode("utf-8"))
        last = max(i for i, c in enumerate(chunks) if c)
        ends[last:] = [n] * (len(ends) - last)
    return "".join(pieces), ends


def _offset_ends(token_bytes: TokenBytes, text: str, ids: list[int]) -> list[int] | None:
    """Token ends in ``text``'s bytes from a fast tokenizer's character offsets (``None`` without them). Tokens
    that share one character's span (SentencePiece byte fallback: ``<0xE4><0xBD><0xA0>`` for "你") end one byte
    after another inside it when their bytes add up to the span's; otherwise each ends where the span ends."""
    try:
        enc = token_bytes.tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                                    return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    if list(enc["input_ids"]) != list(ids):
        return None
    to_byte = [0]
    for ch in text:
        to_byte.append(to_byte[-1] + len(ch.encode("utf-8")))
    spans = [tuple(span) for span in enc["offset_mapping"]]
    ends, last, i = [], 0, 0
    while i < len(spans):
        j = i
        while j + 1 < len(spans) and spans[j + 1] == spans[i]:
            j += 1
        start, end = to_byte[spans[i][0]], to_byte[spans[i][1]]
        sizes = [len(token_bytes(t)) for t in ids[i:j + 1]]
        split = j > i and sum(sizes) == end - start
        for k in range(j - i + 1):
            last = max(last, start + sum(sizes[:k + 1]) if split else end)
            ends.append(last)
        i = j + 1
    if ends:
        ends[-1] = to_byte[-1]
    return ends


def teacher_ends(ids: list[int], text: str, token_bytes: TokenBytes, where: str) -> list[int]:
    """Each of the teacher's tokens' end in ``text``'s UTF-8 bytes (``ids``: the teacher's tokens of ``text``)."""
    chunks = [token_bytes(i) for i in ids]
    if b"".join(chunks) == text.encode("utf-8"):
        return prefix_ends(chunks)
    ends = _offset_ends(token_bytes, text, ids)
    if ends is None:
        raise ConfigError(f"{where}: the teacher's tokens do not spell the response text back and its tokenizer gives "
                          "no character offsets; byte alignment needs one of the two (a fast tokenizer)")
    return ends


def align(s_ends: list[int], t_ends: list[int]) -> list[tuple[int, int, int, int]]:
    """The n:m groups ``(s0, s1, t0, t1)`` of two tokenizations of one text given each token's end byte (module
    docstring); a trailing group with an empty side is dropped."""
    groups = []
    s = t = s0 = t0 = 0
    while s < len(s_ends) and t < len(t_ends):
        if s_ends[s] < t_ends[t]:
            s += 1
        elif s_ends[s] > t_ends[t]:
            t += 1
        else:
            s, t = s + 1, t + 1
            groups.append((s0, s, t0, t))
            s0, t0 = s, t
    if s0 < len(s_ends) and t0 < len(t_ends):
        groups.append((s0, len(s_ends), t0, len(t_ends)))
    return groups


def one_to_one_bytes(groups, s_ends: list[int]) -> tuple[int, int]:
    """``(bytes in one-to-one groups, bytes in all groups)`` of one row (alignment coverage)."""
    one = total = 0
    for s0, s1, t0, t1 in groups:
        size = s_ends[s1 - 1] - (s_ends[s0 - 1] if s0 else 0)
        total += size
        one += size if (s1 - s0 == 1 and t1 - t0 == 1) else 0
    return one, total


def _keys(tokenizer, token_bytes: TokenBytes) -> dict:
    """``key -> [ids in order]``: a token's bytes, or ``("special", content)`` (EOS: ``("eos",)``)."""
    out: dict = {}
    eos = getattr(tokenizer, "eos_token_id", None)
    vocab = {i: s for s, i in tokenizer.get_vocab().items()}
    for i in range(len(tokenizer)):
        if i == eos:
            key = ("eos",)
        elif token_bytes.is_special(i):
            key = ("special", vocab.get(i))
        else:
            key = token_bytes(i)
        out.setdefault(key, []).append(i)
    return out


def matched_ids(student_tok, teacher_tok, student_bytes: TokenBytes, teacher_bytes: TokenBytes
                ) -> tuple[list[int], list[int]]:
    """``(teacher ids, student ids)`` of the tokens whose text is the same in both vocabularies (module docstring)."""
    s_keys = _keys(student_tok, student_bytes)
    t_out, s_out = [], []
    for key, t_ids in _keys(teacher_tok, teacher_bytes).items():
        for t_id, s_id in zip(t_ids, s_keys.get(key, [])):
            t_out.append(t_id)
            s_out.append(s_id)
    return t_out, s_out
