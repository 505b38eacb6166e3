"""What a tokenizer's tokens stand for as text: one token's text and UTF-8 bytes (for logprobs answers), and a
bound on the characters of input text one token can cover (for refusing an over-long prompt untokenized).

``chars_per_token_bound``: a prompt of more than ``room * bound`` characters cannot fit ``room`` tokens,
whatever its tokens, so ``engine.ChatEngine.encode`` refuses it before tokenizing megabytes to learn so.
"""

from __future__ import annotations

import json

CHARS_SAFETY = 4  # normalizers that compose (NFC: e + U+0301 -> é; Hangul jamo: 3 -> 1) shrink text up to 3x

# tokenizers-library components that never drop input characters (they map, compose or split them)
_SAFE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend", "Replace", "Sequence"}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts", "Sequence"}


def _components_keep_text(node, safe: set[str]) -> bool:
    if node is None:
        return True
    kind = node.get("type")
    if kind not in safe:
        return False
    if kind == "Replace":  # a plain-string replacement no shorter than what it replaces
        pattern = node.get("pattern") or {}
        return "String" in pattern and len(node.get("content", "")) >= len(pattern["String"])
    if kind == "Split" and str(node.get("behavior", "")).lower() == "removed":
        return False
    parts = node.get("normalizers") or node.get("pretokenizers") or []
    return all(_components_keep_text(n, safe) for n in parts)


def chars_per_token_bound(tokenizer) -> int | None:
    """An upper bound on the characters of input text one token can stand for, or ``None`` when none is known.

    ``CHARS_SAFETY`` times the longest vocabulary entry (byte-level vocabularies spell each byte as one
    character, so this is also the most bytes a token covers), for a fast tokenizer whose normalizer and
    pre-tokenizer never drop characters, whose model is BPE without fused unknowns, and whose added tokens
    strip no neighbouring whitespace. For anything else (BERT-style whitespace removal, WordPiece's one [UNK]
    per long word, ...) ``None``: such prompts are always tokenized.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # a tokenizer that cannot describe itself: no bound
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
        return None
    if not (_components_keep_text(spec.get("normalizer"), _SAFE_NORMALIZERS)
            and _components_keep_text(spec.get("pre_tokenizer"), _SAFE_PRE_TOKENIZERS)):
        return None
    if any(a.get("lstrip") or a.get("rstrip") for a in spec.get("added_tokens") or []):
        return None
    longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
    return CHARS_SAFETY * longest if longest > 0 else None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a vocabulary entry uses -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()
#: The same table, for other readers of token bytes (``teachers/byte_align.py``).
BYTE_DECODER = _BYTE_DECODER


class TokenText:
    """``piece`` and ``token_bytes`` of ``tokenizer``'s tokens, each computed once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._special = set(getattr(tokenizer, "all_special_ids", None) or [])
        self._special |= set(getattr(tokenizer, "added_tokens_decoder", None) or {})

    def piece(self, token: int) -> str:
        """The text of one token on its own."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.tokenizer.decode([token])
        return text

    def token_bytes(self, token: int) -> list[int]:
        """The UTF-8 bytes one token stands for (a byte-level token may hold part of a character)."""
        raw = self._bytes.get(token)
        if raw is None:
            if self._byte_level and token not in self._special:
                spelled = self.tokenizer.convert_ids_to_tokens(token)
                if isinstance(spelled, str) and all(c in _BYTE_DECODER for c in spelled):
                    raw = [_BYTE_DECODER[c] for c in spelled]
            if raw is None:
                raw = list(self.piece(token).encode("utf-8"))
            self._bytes[token] = raw
        return raw
