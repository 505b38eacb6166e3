"""Judge-free response similarity at RSE's three granularities, each in [0, 1] (1 = identical).

- style: length and formatting features (characters, words, sentence length, bold/italic, exclamations,
  questions, emoji, capitals); per feature ``min/max`` of the two values, averaged.
- structure: counts of paragraphs, bullet and numbered list items, headings, code blocks, table rows and
  quotes (``min/max`` averaged), half-weighted with the order of block types (difflib ratio).
- content: ROUGE-L F1 (``lmdistill.rouge.rouge_l``, stemmed; character-level LCS F1 when a text has
  no Latin letters or digits, as for Chinese), and embedding
  cosine (mean-pooled last hidden state of a local model) when an embedder is given.
- overall: mean of style, structure and content.
"""

from __future__ import annotations

import difflib
import re
import statistics

from lmdistill.models import load_tokenizer, resolve_device
from lmdistill.models.load import _load
from lmdistill.rouge import rouge_l

_SENT = re.compile(r"[.!?。！？]+")
_EMOJI = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF]")


def _ratio(a: float, b: float) -> float:
    if a == b:
        return 1.0
    return min(a, b) / max(a, b) if max(a, b) > 0 else 1.0


def style_features(text: str) -> dict[str, float]:
    words = text.split()
    sentences = [s for s in _SENT.split(text) if s.strip()]
    letters = [c for c in text if c.isalpha()]
    return {
        "chars": len(text), "words": len(words),
        "words_per_sentence": len(words) / len(sentences) if sentences else 0.0,
        "bold": text.count("**") // 2, "italic": len(re.findall(r"(?<![*\w])\*(?!\*)[^*\n]+\*(?!\*)", text)),
        "exclamations": text.count("!") + text.count("！"), "questions": text.count("?") + text.count("？"),
        "emoji": len(_EMOJI.findall(text)),
        "capitals": sum(c.isupper() for c in letters) / len(letters) if letters else 0.0,
    }


def blocks(text: str) -> list[str]:
    """Block types in order: heading, bullet, numbered, code, table, quote, paragraph."""
    out, in_code, para = [], False, False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("```"):
            if not in_code:
                out.append("code")
            in_code, para = not in_code, False
            continue
        if in_code:
            continue
        if not s:
            para = False
            continue
        if re.match(r"#{1,6}\s", s):
            kind = "heading"
        elif re.match(r"[-*+•]\s", s):
            kind = "bullet"
        elif re.match(r"\d+[.)、]\s?", s):
            kind = "numbered"
        elif s.startswith("|"):
            kind = "table"
        elif s.startswith(">"):
            kind = "quote"
        else:
            if para:
                continue
            kind, para = "paragraph", True
            out.append(kind)
            continue
        para = False
        out.append(kind)
    return out


def structure_features(text: str) -> dict[str, int]:
    b = blocks(text)
    return {k: b.count(k) for k in ("paragraph", "bullet", "numbered", "heading", "code", "table", "quote")}


def _feature_similarity(fa: dict, fb: dict) -> float:
    return statistics.fmean(_ratio(fa[k], fb[k]) for k in fa)


def style_similarity(a: str, b: str) -> float:
    return _feature_similarity(style_features(a), style_features(b))


def structure_similarity(a: str, b: str) -> float:
    counts = _feature_similarity(structure_features(a), structure_features(b))
    order = difflib.SequenceMatcher(a=blocks(a), b=blocks(b), autojunk=False).ratio() if (blocks(a) or blocks(b)) else 1.0
    return 0.5 * counts + 0.5 * order


def _char_lcs_f1(a: str, b: str) -> float:
    """ROUGE-L F1 over characters (text without Latin words, e.g. Chinese, which rouge_score drops)."""
    a, b = a[:2000], b[:2000]
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)


def content_similarity(a: str, b: str) -> float:
    if a.strip() == b.strip():
        return 1.0
    if not re.search(r"[A-Za-z0-9]", a) or not re.search(r"[A-Za-z0-9]", b):
        return _char_lcs_f1("".join(a.split()), "".join(b.split()))
    return rouge_l(a, [b]) / 100.0


class Embedder:
    """Sentence embeddings from a local HF model folder: mean of the last hidden state over tokens."""

    def __init__(self, path: str, device: str | None = None, max_length: int = 512):
        import torch
        from transformers import AutoModel

        self.name = str(path)
        self.tokenizer = load_tokenizer(path)
        self.device = resolve_device(device)
        self.model = _load(AutoModel, str(path), dtype=torch.float32).to(self.device).eval()
        self.max_length = max_length

    def embed(self, text: str):
        import torch

        ids = self.tokenizer(text or " ", return_tensors="pt", truncation=True, max_length=self.max_length)
        with torch.inference_mode():
            hidden = self.model(**{k: v.to(self.device) for k, v in ids.items()}).last_hidden_state[0]
        return hidden.mean(0)

    def cosine(self, a: str, b: str) -> float:
        import torch

        return float(torch.nn.functional.cosine_similarity(self.embed(a), self.embed(b), dim=0))


def similarity(a: str, b: str, embedder: Embedder | None = None) -> dict[str, float]:
    out = {"style": style_similarity(a, b), "structure": structure_similarity(a, b),
           "content": content_similarity(a, b)}
    out["overall"] = statistics.fmean([out["style"], out["structure"], out["content"]])
    if embedder is not None:
        out["embedding"] = embedder.cosine(a, b)
    return {k: round(v, 4) for k, v in out.items()}
