"""Span priors on real sentences with the project tokenizer, and the span correlation loss."""

from __future__ import annotations

import pytest
import torch

from lmdistill.errors import ConfigError
from lmdistill.losses import LossInputError
from lmdistill.losses.span_correlation import (
    SpanCorrelationLoss, batch_span_ids, char_spans, parse_prior, span_correlation_loss, token_span_ids)

TEXT = "The quick brown fox jumped over the lazy dog, and then it ran to the river. Don't stop!"


def _groups(tokenizer, text, prior):
    ids, spans = token_span_ids(text, tokenizer, prior)
    groups: dict[int, list[int]] = {}
    for tok, sid in zip(ids, spans):
        groups.setdefault(sid, []).append(tok)
    return {sid: tokenizer.decode(toks).strip() for sid, toks in groups.items()}


def test_phrase_prior_chunks_on_punctuation_and_function_words(tokenizer):
    got = _groups(tokenizer, TEXT, "phrase")
    phrases = [v for k, v in sorted(got.items()) if k >= 0]
    assert phrases == ["The quick brown fox jumped", "over the lazy dog", "and then it ran", "to the river",
                       "Don't", "stop"]
    assert set(got[-1]) <= set(",.!")  # punctuation is in no span


def test_word_prior_on_real_sentence(tokenizer):
    text = "Photosynthesis converts sunlight into chemical energy."
    got = _groups(tokenizer, text, "word")
    assert [v for k, v in sorted(got.items()) if k >= 0] == text.rstrip(".").split()
    ids, spans = token_span_ids(text, tokenizer, "word")
    assert len(ids) > len(text.split())  # some word is split into several tokens, they share one id
    assert len(set(s for s in spans if s >= 0)) == 6


def test_sentence_prior(tokenizer):
    text = "Paris is the capital of France. It is known for art!\nBerlin is in Germany"
    got = _groups(tokenizer, text, "sentence")
    assert [v for k, v in sorted(got.items()) if k >= 0] == [
        "Paris is the capital of France.", "It is known for art!", "Berlin is in Germany"]


def test_fixed_prior_and_ids_path_equal_text_path(tokenizer):
    ids, spans = token_span_ids(TEXT, tokenizer, "fixed:4")
    assert spans == [i // 4 for i in range(len(ids))]
    for prior in ("phrase", "word", "sentence"):
        a = token_span_ids(TEXT, tokenizer, prior)
        b = token_span_ids(a[0], tokenizer, prior)
        assert a == b
    # EOS (a special token) is in no span
    _, with_eos = token_span_ids(ids + [tokenizer.eos_token_id], tokenizer, "phrase")
    assert with_eos[-1] == -1 and with_eos[:-1] == token_span_ids(TEXT, tokenizer, "phrase")[1]


def test_char_spans_and_prior_errors():
    assert char_spans("in the park, we sat", "phrase") == [(0, 11), (13, 19)]
    assert parse_prior("fixed:3") == ("fixed", 3)
    for bad in ("clause", "fixed:0", "fixed:x", None):
        with pytest.raises(ConfigError, match="valid: phrase, word, sentence, fixed:N"):
            parse_prior(bad)


def test_batch_span_ids_alignment(tokenizer):
    resp = tokenizer("in the park", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    out = batch_span_ids([resp, resp[:2]], tokenizer, seq_len=10, first_position=[3, 6], prior="phrase")
    assert out.shape == (2, 10)
    assert out[0, :3].tolist() == [-1] * 3 and out[0, 3] == 0 and out[0, 3 + len(resp) - 1] == -1
    assert out[1, 6:8].tolist() == [0, 0] and out[1, 8:].tolist() == [-1, -1]


def _ref(s, t, span, mask, form="literal"):
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1] - 1):
            if span[b][i] < 0 or span[b][i] != span[b][i + 1] or not (mask[b][i] and mask[b][i + 1]):
                continue
            p0, p1 = torch.softmax(t[b, i], -1), torch.softmax(t[b, i + 1], -1)
            q0, q1 = torch.softmax(s[b, i], -1), torch.softmax(s[b, i + 1], -1)
            a = [float(p0[v] * p1[v]) for v in range(s.shape[2])]
            b_ = [float(q0[v] * q1[v]) for v in range(s.shape[2])]
            d = sum((x - y) ** 2 for x, y in zip(a, b_))
            if form == "normalized":
                d /= sum(x * x for x in a) + sum(y * y for y in b_)
            total += d
            n += 1
    return total / n


def test_loss_matches_brute_force_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 6, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    span = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, -1, 3, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 1]])
    got = span_correlation_loss(s, t, span, mask)
    assert got.item() == pytest.approx(_ref(s.detach(), t, span.tolist(), mask.tolist()), rel=1e-12)
    assert torch.autograd.gradcheck(lambda x: span_correlation_loss(x, t, span, mask, temperature=1.3), (s,))
    assert SpanCorrelationLoss()(s, t, span, mask).item() == got.item()


def test_normalized_form_matches_brute_force_and_is_scale_free():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 6, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    span = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, -1, 3, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 1]])
    got = span_correlation_loss(s, t, span, mask, form="normalized")
    assert got.item() == pytest.approx(_ref(s.detach(), t, span.tolist(), mask.tolist(), "normalized"), rel=1e-12)
    assert torch.autograd.gradcheck(lambda x: span_correlation_loss(x, t, span, mask, form="normalized"), (s,))
    # a large vocabulary shrinks the literal form by orders of magnitude, not the normalized one
    big_s = torch.randn(1, 4, 20000, generator=g, dtype=torch.float64)
    big_t = torch.randn(1, 4, 20000, generator=g, dtype=torch.float64)
    one = torch.zeros(1, 4, dtype=torch.long)
    assert span_correlation_loss(big_s, big_t, one).item() < 1e-6
    assert 0.1 < span_correlation_loss(big_s, big_t, one, form="normalized").item() <= 2.0
    with pytest.raises(ConfigError, match="form"):
        span_correlation_loss(s, t, span, mask, form="cosine")


def test_loss_zero_at_equality_and_without_pairs():
    s = torch.randn(2, 5, 7, requires_grad=True)
    span = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert span_correlation_loss(s, s.detach().clone(), span).item() == pytest.approx(0.0, abs=1e-12)
    no_pairs = torch.tensor([[0, 1, 2, 3, 4], [-1, -1, -1, -1, -1]])
    val = span_correlation_loss(s, torch.randn(2, 5, 7), no_pairs)
    val.backward()
    assert val.item() == 0.0 and torch.all(s.grad == 0)


def test_positions_outside_pairs_never_matter():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 6, 5, generator=g), torch.randn(1, 6, 5, generator=g)
    span = torch.tensor([[0, 0, -1, 1, 2, 2]])  # positions 2 and 3 are in no pair
    a = span_correlation_loss(s, t, span)
    s2, t2 = s.clone(), t.clone()
    s2[0, 2:4] = float("nan")
    t2[0, 2:4] = 50.0
    assert span_correlation_loss(s2, t2, span).item() == a.item()


def test_shape_errors():
    with pytest.raises(LossInputError, match="span_ids shape"):
        span_correlation_loss(torch.randn(2, 5, 7), torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
