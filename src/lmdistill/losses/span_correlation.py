"""Span-level correlation consistency (MGSR, arXiv 2407.10068, Sec. 4.3) and its span priors.

The response is split into spans by a *span prior*; inside a span, the correlation of consecutive
tokens (t, t+1) is the element-wise product of their next-token distributions, ``p_t * p_{t+1}`` for
the teacher and ``q_t * q_{t+1}`` for the student, and the loss is::

    L_span = mean over pairs (t, t+1) in one span of || p_t * p_{t+1} - q_t * q_{t+1} ||_2^2

``form=normalized`` (ours, not the paper's): with a = p_t * p_{t+1} and b = q_t * q_{t+1},

    L_span = mean over pairs of || a - b ||^2 / (|| a ||^2 + || b ||^2)      (in [0, 2], scale-free)

The literal form is the squared distance of two products of probabilities: on a 49k-token vocabulary it is
about 1e-8 of the KD term and its gradient a like share of the total (bench/mgsr_terms.py), so at weight 1 it
is inert. Dividing by the squared norms keeps its direction and makes it invariant to the scale of a and b.

Span priors (``prior=``):

* ``phrase`` (default): a dependency-free chunker.  Punctuation ends a phrase (and is no part of
  one); a function word (determiner, preposition, conjunction, pronoun, auxiliary, see
  :data:`FUNCTION_WORDS`) starts a new phrase unless the previous word was a function word too,
  so "put the red box | on the table | and | walk | to the door" keeps "on the table" together.
  The paper used an off-the-shelf noun/verb-phrase chunker; none can be downloaded here.
* ``word``: the tokens of one word (letters, digits, apostrophes joined) form a span.
* ``sentence``: sentences end at ``.``, ``!``, ``?`` followed by white space, or at a newline.
* ``fixed:N``: consecutive blocks of N tokens, regardless of the text.

Character spans are mapped to tokens through the tokenizer's offsets: a token belongs to the span
holding its first non-space character; tokens of white space or special tokens (EOS) are in no
span (id -1) and never form a pair.
"""

from __future__ import annotations

import bisect
import re
from typing import Sequence

import torch

from lmdistill.errors import ConfigError
from lmdistill.losses.divergences import check_temperature, log_probs
from lmdistill.losses.masking import as_bool_mask, graph_zero
from lmdistill.losses.term import Term, TermInputs
from lmdistill.losses.vocab import LossInputError, align_vocab

#: Closed-class English words that start a new phrase in the ``phrase`` prior.
FUNCTION_WORDS = frozenset("""
a an the this that these those my your his her its our their some any each every no all both either neither
of in on at by for with about against between into through during before after above below to from up down
out off over under again further than as until while since without within along across behind beyond near
toward towards upon among around per via
and or but nor so yet because although though if unless whereas whether then
i you he she it we they me him us them myself yourself himself herself itself ourselves themselves
who whom whose which what where when why how
is am are was were be been being have has had having do does did will would shall should can could may might
must not
""".split())

_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*", re.UNICODE)
_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n+")


def parse_prior(prior: str) -> tuple[str, int]:
    """``"phrase"`` -> ("phrase", 0); ``"fixed:8"`` -> ("fixed", 8); ConfigError otherwise."""
    if prior in ("phrase", "word", "sentence"):
        return prior, 0
    if isinstance(prior, str) and prior.startswith("fixed:"):
        try:
            n = int(prior.split(":", 1)[1])
        except ValueError:
            n = 0
        if n >= 1:
            return "fixed", n
    raise ConfigError(f"unknown span prior {prior!r}; valid: phrase, word, sentence, fixed:N (N >= 1)")


def _words(text: str) -> list[tuple[int, int, bool]]:
    """(start, end, is_word) for every word and punctuation character, in order."""
    items = [(m.start(), m.end(), True) for m in _WORD.finditer(text)]
    items += [(m.start(), m.end(), False) for m in _PUNCT.finditer(text)]
    return sorted(items)


def char_spans(text: str, prior: str = "phrase") -> list[tuple[int, int]]:
    """Character spans ``[(start, end), ...]`` of ``text`` under a text prior (phrase, word, sentence)."""
    kind, _ = parse_prior(prior)
    if kind == "fixed":
        raise ConfigError("fixed:N spans are defined on tokens, not characters")
    if kind == "sentence":
        spans, start = [], 0
        for m in _SENTENCE_END.finditer(text):
            if text[start:m.end()].strip():
                spans.append((start, m.end()))
            start = m.end()
        if text[start:].strip():
            spans.append((start, len(text)))
        return spans
    items = _words(text)
    if kind == "word":
        return [(s, e) for s, e, is_word in items if is_word]
    spans: list[tuple[int, int]] = []
    current: list[int] | None = None  # [start, end] of the open phrase
    prev_function = False
    for s, e, is_word in items:
        if not is_word:  # punctuation closes the phrase
            if current:
                spans.append(tuple(current))
            current, prev_function = None, False
            continue
        func = text[s:e].lower() in FUNCTION_WORDS
        if current is None or (func and not prev_function):
            if current:
                spans.append(tuple(current))
            current = [s, e]
        else:
            current[1] = e
        prev_function = func
    if current:
        spans.append(tuple(current))
    return spans


def _token_offsets(ids: Sequence[int], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Text of ``ids`` and each token's character range in it."""
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return text, [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        pass
    # re-tokenising the text gave other tokens: measure each prefix's decoded length instead
    offsets, prev = [], 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(ids[: i + 1], skip_special_tokens=False))
        offsets.append((prev, max(prev, end)))
        prev = max(prev, end)
    return text, offsets


def token_span_ids(response: str | Sequence[int], tokenizer, prior: str = "phrase") -> tuple[list[int], list[int]]:
    """Tokens of ``response`` and the span id of each (-1: in no span).

    ``response`` is the response text (tokenised without special tokens) or its token ids.
    Returns ``(token_ids, span_ids)`` of equal length; span ids count 0, 1, ... in order.
    """
    kind, n = parse_prior(prior)
    if isinstance(response, str):
        enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        ids, text, offsets = list(enc["input_ids"]), response, [tuple(o) for o in enc["offset_mapping"]]
    else:
        ids = [int(i) for i in response]
        text, offsets = _token_offsets(ids, tokenizer) if kind != "fixed" else ("", [])
    if kind == "fixed":
        return ids, [i // n for i in range(len(ids))]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    spans = char_spans(text, prior)
    starts = [s for s, _ in spans]
    out = []
    for tok, (s, e) in zip(ids, offsets):
        if tok in special:
            out.append(-1)
            continue
        k = s
        while k < e and text[k].isspace():
            k += 1
        j = bisect.bisect_right(starts, k) - 1
        out.append(j if k < e and j >= 0 and spans[j][0] <= k < spans[j][1] else -1)
    return ids, out


def batch_span_ids(responses: Sequence[Sequence[int]], tokenizer, seq_len: int, first_position: int | Sequence[int],
                   prior: str = "phrase") -> torch.Tensor:
    """Span ids ``[B, seq_len]`` aligned with logits positions for a batch of responses.

    Response token i of row b is predicted by logits position ``first_position[b] + i`` (for a
    left-padded prompt of width P followed by the response, ``first_position = P - 1``).
    Positions outside the response get -1.
    """
    firsts = [first_position] * len(responses) if isinstance(first_position, int) else list(first_position)
    if len(firsts) != len(responses):
        raise LossInputError("first_position needs one entry per response")
    out = torch.full((len(responses), seq_len), -1, dtype=torch.long)
    for b, (resp, first) in enumerate(zip(responses, firsts)):
        _, ids = token_span_ids(list(resp), tokenizer, prior)
        for i, sid in enumerate(ids):
            pos = first + i
            if 0 <= pos < seq_len:
                out[b, pos] = sid
    return out


SPAN_FORMS = ("literal", "normalized")


def span_correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, span_ids: torch.Tensor,
                          mask: torch.Tensor | None = None, *, temperature: float = 1.0,
                          form: str = "literal") -> torch.Tensor:
    """Mean over consecutive pairs (t, t+1) in one span of ||p_t * p_{t+1} - q_t * q_{t+1}||^2 (``literal``), or
    of ||a - b||^2 / (||a||^2 + ||b||^2) with a = p_t * p_{t+1}, b = q_t * q_{t+1} (``normalized``, ours).

    Args:
        student_logits, teacher_logits: ``[B, T, V]`` (vocabularies may differ by padding rows).
        span_ids: ``[B, T]`` span id of the token each logits position predicts, -1 for none
            (see :func:`batch_span_ids`).
        mask: ``[B, T]`` 0/1; a pair counts only when both positions are trained.
        temperature: p = softmax(teacher / T), q = softmax(student / T).

    Returns 0 (with a graph) when there is no pair.
    """
    t = check_temperature(temperature)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits)
    if student_logits.dim() != 3:
        raise LossInputError(f"span correlation needs [batch, seq, vocab] logits, got {tuple(student_logits.shape)}")
    span_ids = torch.as_tensor(span_ids, device=student_logits.device)
    if span_ids.shape != student_logits.shape[:2]:
        raise LossInputError(f"span_ids shape {tuple(span_ids.shape)} does not match logits positions "
                             f"{tuple(student_logits.shape[:2])}")
    bmask = as_bool_mask(mask, student_logits.shape[:2], student_logits.device)
    valid = span_ids >= 0
    if bmask is not None:
        valid = valid & bmask
    pair = valid[:, :-1] & valid[:, 1:] & (span_ids[:, :-1] == span_ids[:, 1:])
    b, pos = pair.nonzero(as_tuple=True)
    if b.numel() == 0:
        return graph_zero(student_logits)
    q0 = log_probs(student_logits[b, pos], t).exp()
    q1 = log_probs(student_logits[b, pos + 1], t).exp()
    p0 = log_probs(teacher_logits[b, pos], t).exp()
    p1 = log_probs(teacher_logits[b, pos + 1], t).exp()
    a, b_ = p0 * p1, q0 * q1
    dist = (a - b_).pow(2).sum(-1)
    if form == "normalized":
        dist = dist / (a.pow(2).sum(-1) + b_.pow(2).sum(-1)).clamp(min=1e-300)
    elif form != "literal":
        raise ConfigError(f"span form must be one of {', '.join(SPAN_FORMS)}, got {form!r}")
    return dist.mean()


class SpanCorrelationLoss(torch.nn.Module):
    """Module form: ``SpanCorrelationLoss(temperature=1.0)(student_logits, teacher_logits, span_ids, mask)``."""

    def __init__(self, temperature: float = 1.0, form: str = "literal"):
        super().__init__()
        self.temperature, self.form = check_temperature(temperature), form

    def forward(self, student_logits, teacher_logits, span_ids, mask=None):
        return span_correlation_loss(student_logits, teacher_logits, span_ids, mask, temperature=self.temperature,
                                     form=self.form)


class SpanTerm(Term):
    """``span`` as a recipe term: ``L_span`` on the policy's sequences, with spans from ``prior`` (default
    ``phrase``) over each sequence's response tokens; ``temperature`` as for the divergences; ``form``
    ``literal`` (the paper's) or ``normalized`` (ours, scale-free)."""

    needs_teacher = True
    whole_logits = True   # pairs of consecutive positions

    def __init__(self, *, prior: str = "phrase", temperature: float = 1.0, form: str = "literal"):
        super().__init__()
        self.prior, self.temperature, self.form = prior, temperature, form

    @classmethod
    def check_params(cls, params: dict, where: str) -> None:
        super().check_params(params, where)
        try:
            parse_prior(params.get("prior", "phrase"))
            check_temperature(params.get("temperature", 1.0))
            if params.get("form", "literal") not in SPAN_FORMS:
                raise ConfigError(f"form must be one of {', '.join(SPAN_FORMS)}, got {params['form']!r}")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        rows = inputs.rows
        # logits position len(prompt) - 1 + i predicts response token i; the objective drops the last position
        width = inputs.sequences["input_ids"].shape[1]
        span_ids = batch_span_ids([r.response_ids for r in rows], inputs.tokenizer, width - 1,
                                  [len(r.prompt_ids) - 1 for r in rows], self.prior)
        return span_correlation_loss(inputs.student_logits, inputs.teacher_logits,
                                     span_ids.to(inputs.student_logits.device), inputs.targets[1],
                                     temperature=self.temperature, form=self.form)
