"""Cross-tokenizer distillation (issue 32, item 1), the pieces: byte spans of tokens (byte-level BPE, SentencePiece
with byte fallback, invalid UTF-8 from sampling), the n:m groups of two tokenizations (hand-built cases and a
hypothesis property), the merges, the sorted L1 and its sparse form, `uld` and `gold` with two copies of one tokenizer
against the direct same-tokenizer divergences, and TRL GOLD's ULDLoss (trl 1.16.0) where the rules agree. Runs,
served teachers and caches: tests/test_cross_tokenizer_train.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.data import collate_for_training, load_examples, tokenize_examples
from lmdistill.losses.aligned import hybrid, merge_logprobs, sorted_l1, sorted_l1_sparse
from lmdistill.losses.term import TermInputs
from lmdistill.losses.terms import divergence_term
from lmdistill.losses.uld import GOLDTerm, ULDTerm
from lmdistill.models import load_model
from lmdistill.models.tokenizer import train_sp_tokenizer
from lmdistill.teachers import LocalTeacher, open_teacher
from lmdistill.teachers.byte_align import TokenBytes, align, matched_ids, student_text, teacher_ends
from lmdistill.teachers.cross_rows import Tokenizers


@pytest.fixture(scope="module")
def sp_tok():
    return train_sp_tokenizer()


def rows_of(tokenizer, n=4, split="dolly:train", template="chat"):
    rows, _ = tokenize_examples(load_examples(split).examples[:n], tokenizer, template=template,
                                max_prompt_length=80, max_length=96)
    return rows


def inputs(student, teacher, rows, tokenizer, whole=False) -> TermInputs:
    batch = collate_for_training(rows, tokenizer.pad_token_id)
    return TermInputs(student, teacher, batch, batch, same=True, whole=whole, rows=rows, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------ token bytes
TEXT = " Hello  wörld 你好 👍🏽 e\u0301\n\n  x"


@pytest.mark.parametrize("which", ["byte_level", "sentencepiece"])
def test_token_bytes_spell_the_text_and_specials_are_empty(which, tokenizer, sp_tok):
    tok = tokenizer if which == "byte_level" else sp_tok
    tb = TokenBytes(tok)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert b"".join(tb(i) for i in ids) == TEXT.encode()
    assert tb(tok.eos_token_id) == b"" and tb(tok.pad_token_id) == b""
    if which == "sentencepiece":   # the CJK characters fall back to <0xNN> byte tokens, each one byte
        assert tok.convert_ids_to_tokens(tok("你", add_special_tokens=False)["input_ids"]) == ["<0xE4>", "<0xBD>",
                                                                                             "<0xA0>"]
        assert tb(tok.convert_tokens_to_ids("<0xE4>")) == b"\xe4" and tb(tok.convert_tokens_to_ids("▁the")) == b" the"


def test_student_text_with_invalid_utf8_maps_each_token_into_the_replaced_text():
    chunks = [b"a", b"\xe4\xbd", b"\xa0b", b"\xff", b"c\xf0\x9f"]   # a 你 b, a stray byte, an unfinished emoji
    text, ends = student_text(chunks)
    assert text == "a你b\ufffdc\ufffd"
    assert ends == [1, 1, 5, 8, len(text.encode())]   # the half character ends where its character starts


def test_teacher_ends_from_offsets_when_its_tokens_do_not_spell_the_text(sp_tok):
    """A normalizer that changes the text (lower case here): the teacher's pieces spell "hello", the text says
    "HeLLo", so the ends come from the fast tokenizer's character offsets, mapped to bytes."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    backend = sp_tok.backend_tokenizer.__class__.from_str(sp_tok.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Lowercase()
    lower = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    text = "HeLLo wÖrld"
    ids = lower(text, add_special_tokens=False)["input_ids"]
    tb = TokenBytes(lower)
    assert b"".join(tb(i) for i in ids) != text.encode()
    ends = teacher_ends(ids, text, tb, "test")
    spans = lower(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    want = [len(text[:e].encode()) for _, e in spans]
    for i in range(1, len(spans)):   # "ö" in byte-fallback pieces: two tokens, one span, one byte each
        if spans[i] == spans[i - 1]:
            want[i - 1] = want[i] - len(tb(ids[i]))
    assert ends == want and ends[-1] == len(text.encode())
    assert any(spans[i] == spans[i - 1] for i in range(1, len(spans)))   # the case is there


# ------------------------------------------------------------------------------------------------ groups
@pytest.mark.parametrize("s_ends,t_ends,want", [
    ([3, 6], [6], [(0, 2, 0, 1)]),                                   # 2:1
    ([6], [2, 4, 6], [(0, 1, 0, 3)]),                               # 1:3
    ([1, 2, 3], [2, 3], [(0, 2, 0, 1), (2, 3, 1, 2)]),              # "é!" as C3|A9|! against é|!
    ([1, 2, 4], [1, 3, 4], [(0, 1, 0, 1), (1, 3, 1, 3)]),           # "a  b": a| |␣b against a|␣␣|b
    ([2, 4, 4], [1, 4, 4], [(0, 2, 0, 2), (2, 3, 2, 3)]),           # both EOS (zero width, last): one to one
    ([2, 4, 4], [1, 4], [(0, 2, 0, 2)]),                            # an EOS only the student has: no group
    ([0, 2, 4], [2, 4], [(0, 2, 0, 1), (2, 3, 1, 2)]),              # a zero-width special first joins the group
])
def test_hand_built_alignments(s_ends, t_ends, want):
    assert align(s_ends, t_ends) == want


def test_multibyte_character_split_differently_on_two_real_tokenizers(tokenizer, sp_tok):
    """'ö' is one token for neither side here: the student's byte-level BPE splits it C3|B6 inside 'wö' pieces; the
    teacher falls back to <0xC3><0xB6>; the groups still close only where both sides end."""
    tk = Tokenizers(tokenizer, sp_tok, "auto")
    ids = tokenizer("wörld 你好", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    s_ends, t_ids, t_ends = tk.response(ids, "test")
    assert t_ids[-1] == sp_tok.eos_token_id and t_ends[-1] == s_ends[-1] == len("wörld 你好".encode())
    groups = align(s_ends, t_ends)
    assert groups[-1] == (len(ids) - 1, len(ids), len(t_ids) - 1, len(t_ids))
    for s0, s1, t0, t1 in groups:
        assert s_ends[s1 - 1] == t_ends[t1 - 1]


ALPHABET = st.sampled_from(list("ab xyz.,\n\t") + ["你", "好", "世", "界", "👍", "🏽", "🇫🇷", "e\u0301", "\u0308",
                                                     "  ", "ö", "ß", "—", "\u200d", "<eos>", "▁"])


def test_byte_fallback_pieces_of_one_character_each_end_a_byte_further(tokenizer, sp_tok):
    """A literal "▁" makes the teacher's tokens spell a space where the text has three bytes, so the ends come from
    character offsets, where SentencePiece's three byte-fallback pieces of "你" share one span: each must end one
    byte further (4, 5, 6), not all at 6, or the walk leaves the last two without a group (found by hypothesis)."""
    ids = tokenizer("\u2581\u4f60", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    s_ends, t_ids, t_ends = Tokenizers(tokenizer, sp_tok, "auto").response(ids, "test")
    assert sp_tok.convert_ids_to_tokens(t_ids) == ["\u2581", "<0xE4>", "<0xBD>", "<0xA0>", "<eos>"]
    assert t_ends == [3, 4, 5, 6, 6]
    groups = align(s_ends, t_ends)
    assert groups[-1][3] == len(t_ids) and [g[2] for g in groups] == [0] + [g[3] for g in groups[:-1]]


@settings(max_examples=60, deadline=None)
@given(st.lists(ALPHABET, min_size=0, max_size=30), st.booleans(), st.data())
def test_every_response_byte_lands_in_exactly_one_group(tokenizer, sp_tok, parts, sampled, data):
    """Texts of emoji, CJK and combining marks, and (``sampled``) arbitrary student token sequences that may spell
    invalid UTF-8: the groups partition both sides' tokens in order, each group's two sides cover the same bytes,
    and together they cover every byte of the text the teacher reads once. Our walk equals TRL's."""
    from trl.experimental.gold.gold_trainer import ULDLoss

    text = "".join(parts)
    if sampled:
        ids = data.draw(st.lists(st.integers(7, len(tokenizer) - 1), min_size=1, max_size=20))
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ids + [tokenizer.eos_token_id]
    tk = Tokenizers(tokenizer, sp_tok, "auto")
    s_ends, t_ids, t_ends = tk.response(ids, "test")
    read, _ = student_text([tk.student_bytes(t) for t in ids])
    assert t_ends[-1] == s_ends[-1] == len(read.encode())
    groups = align(s_ends, t_ends)
    assert [g[0] for g in groups] == [0] + [g[1] for g in groups[:-1]] and groups[-1][1] == len(ids)
    assert [g[2] for g in groups] == [0] + [g[3] for g in groups[:-1]] and groups[-1][3] == len(t_ids)
    covered = []
    for s0, s1, t0, t1 in groups:
        start = s_ends[s0 - 1] if s0 else 0
        assert (t_ends[t0 - 1] if t0 else 0) == start and t_ends[t1 - 1] == s_ends[s1 - 1]
        covered += list(range(start, s_ends[s1 - 1]))
    assert covered == list(range(len(read.encode())))
    trl_s, trl_t = ULDLoss._align_by_byte_offsets([(0, e) for e in s_ends], [(0, e) for e in t_ends])
    assert [(g[0], g[-1] + 1, h[0], h[-1] + 1) for g, h in zip(trl_s, trl_t)] == groups


# ------------------------------------------------------------------------------------------------ merges, distances
def test_merges_are_the_documented_products():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    own = lp[torch.arange(3), torch.tensor([1, 4, 2])]
    start, stop = torch.tensor([0]), torch.tensor([3])
    observed = merge_logprobs(lp, own, start, stop, "observed").exp()[0]
    bayesian = merge_logprobs(lp, own, start, stop, "bayesian").exp()[0]
    assert torch.allclose(observed, lp[0].exp() * own[1].exp() * own[2].exp())
    assert torch.allclose(bayesian, own[0].exp() * own[1].exp() * lp[2].exp())


def test_sorted_l1_and_its_sparse_form():
    torch.manual_seed(1)
    q = torch.softmax(torch.randn(4, 7, dtype=torch.float64), -1)
    p = torch.softmax(torch.randn(4, 11, dtype=torch.float64), -1)
    a, b = q.sort(-1, descending=True).values, p.sort(-1, descending=True).values
    want = (torch.cat([a, torch.zeros(4, 4, dtype=a.dtype)], -1) - b).abs().sum(-1)
    assert torch.allclose(sorted_l1(q, p), want)
    assert torch.allclose(sorted_l1_sparse(q, p, torch.zeros(4, dtype=p.dtype)), want)   # K covers the vocabulary
    top, ids = p.topk(3, -1)
    rest = 1 - top.sum(-1)
    approx = sorted_l1_sparse(q, top, rest)
    assert torch.all(approx <= want + 1e-12)   # the tails as one mass each: never more than the full L1
    assert torch.allclose(approx, (a[:, :3] - b[:, :3]).abs().sum(-1) + (a[:, 3:].sum(-1) - rest).abs())


# ------------------------------------------------------------------------------------------------ same tokenizer
@pytest.fixture(scope="module")
def same(model_dirs, tokenizer):
    """A cross-tokenizer teacher over the micro teacher with a second copy of the student's tokenizer."""
    student = load_model(model_dirs["student"], trainable=True)
    teacher = open_teacher(f"xtok:{model_dirs['teacher']}", tokenizer=tokenizer)
    assert teacher.tokenizer is not tokenizer
    return student, teacher, LocalTeacher(load_model(model_dirs["teacher"]), tokenizer)


def test_identical_tokenizers_give_one_to_one_groups_and_the_direct_uld(same, tokenizer):
    student, teacher, _ = same
    rows = rows_of(tokenizer)
    inp = inputs(student, teacher, rows, tokenizer)
    al = inp.teacher_aligned
    n = sum(len(r.response_ids) for r in rows)
    assert torch.equal(al.groups, torch.stack([torch.arange(n), torch.arange(1, n + 1)] * 2, 1)) and al.coverage == 1
    assert torch.equal(al.teacher_ids, torch.tensor([t for r in rows for t in r.response_ids]))
    got = ULDTerm()(inp)
    with torch.no_grad():
        t_logits = LocalTeacher(teacher.model).logits(inp.sequences, inp.targets[1], False)

    def direct(s_logits, dtype):   # mean over positions of L1(sort(q), sort(p)): ULD with one tokenizer
        q, p = (torch.log_softmax(x.to(dtype), -1).exp() for x in (s_logits, t_logits))
        return (q.sort(-1, descending=True).values - p.sort(-1, descending=True).values).abs().sum(-1).mean()

    assert torch.allclose(got.double(), direct(inp.student_logits, torch.float64), atol=1e-6)
    # the gradient: sort's subgradient depends on the order of near-equal probabilities, so the reference sorts the
    # same float32 values (float64 would order some of the 4096 near-uniform entries differently)
    (g,) = torch.autograd.grad(got, inp.student_logits)
    (w,) = torch.autograd.grad(direct(inp.student_logits, torch.float32), inp.student_logits)
    assert torch.allclose(g, w, rtol=1e-4, atol=1e-12) and w.abs().max() > 0
    assert torch.allclose(ULDTerm()(inputs(student, teacher, rows, tokenizer, whole=True)), got)   # [B, T, V] logits


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.0])
def test_identical_tokenizers_gold_is_the_same_tokenizer_jsd(same, tokenizer, beta):
    student, teacher, local = same
    rows = rows_of(tokenizer)
    got = GOLDTerm(beta=beta)(inputs(student, teacher, rows, tokenizer))
    want = divergence_term("jsd")(beta=beta)(inputs(student, local, rows, tokenizer))
    assert torch.allclose(got, want, atol=1e-6), (float(got), float(want))
    for merge in ("observed", "bayesian"):   # one-token groups: both merges are the distribution itself
        assert torch.allclose(GOLDTerm(beta=beta, merge=merge)(inputs(student, teacher, rows, tokenizer)), got)


def test_identical_tokenizers_match_every_id_to_itself(tokenizer):
    t_ids, s_ids = matched_ids(tokenizer, tokenizer, TokenBytes(tokenizer), TokenBytes(tokenizer))
    assert sorted(t_ids) == list(range(len(tokenizer))) and t_ids == s_ids


# ------------------------------------------------------------------------------------------------ TRL parity
def trl_uld(merge: str, hybrid_loss: bool, student_tok=None, teacher_tok=None):
    from trl.experimental.gold.gold_trainer import ULDLoss

    cfg = SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                          uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                          use_extended_uld=True, uld_token_merge_strategy=merge, uld_use_hybrid_loss=hybrid_loss,
                          uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    return ULDLoss(cfg, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok)


def trl_case(s_resp, t_resp, s_ends, t_ends, vs, vt, prompt=3, seed=0):
    """TRL's inputs (``[1, T, V]`` logits at every position, labels, ids, byte offsets) and ours (the logits at the
    response tokens, i.e. one position earlier: logits at t predict token t + 1)."""
    g = torch.Generator().manual_seed(seed)
    s_ids = torch.tensor([[5] * prompt + s_resp])
    t_ids = torch.tensor([[6] * prompt + t_resp])
    s_logits = torch.randn(1, s_ids.shape[1], vs, generator=g, dtype=torch.float64)
    t_logits = torch.randn(1, t_ids.shape[1], vt, generator=g, dtype=torch.float64)

    def offsets(ends):
        starts = [0] + ends[:-1]
        return torch.tensor([[(0, 0)] * prompt + list(zip(starts, ends))])

    labels = lambda ids: torch.cat([torch.full((1, prompt), -100), ids[:, prompt:]], 1)   # noqa: E731
    trl_args = dict(student_logits=s_logits, teacher_logits=t_logits, student_labels=labels(s_ids),
                    teacher_labels=labels(t_ids), student_input_ids=s_ids, teacher_input_ids=t_ids,
                    student_byte_offsets=offsets(s_ends), teacher_byte_offsets=offsets(t_ends))
    ours = (s_logits[0, prompt - 1:-1], t_logits[0, prompt - 1:-1], torch.tensor(s_resp), torch.tensor(t_resp))
    return trl_args, ours


def our_groups_l1(ours, s_ends, t_ends, merge):
    sl, tl, s_ids, t_ids = ours
    lq, lp = torch.log_softmax(sl, -1), torch.log_softmax(tl, -1)
    g = torch.tensor(align(s_ends, t_ends))
    mq = merge_logprobs(lq, lq.gather(-1, s_ids[:, None])[:, 0], g[:, 0], g[:, 1], merge)
    mp = merge_logprobs(lp, lp.gather(-1, t_ids[:, None])[:, 0], g[:, 2], g[:, 3], merge)
    return mq, mp


# 2:1, 1:2 and 1:1 groups: student "ab|c|de" ends [1,2,3,5], teacher [2,3,4,5]
CASE = dict(s_resp=[1, 2, 3, 4], t_resp=[7, 8, 9, 10], s_ends=[1, 2, 3, 5], t_ends=[2, 3, 4, 5], vs=9, vt=13)


def test_uld_equals_trls_bayesian_merge():
    """trl/experimental/gold/gold_trainer.py:460-466 (bayesian reads logits one position earlier, as ours always
    does), :530 (the walk), :555-623 (the merge), :505-523 (sorted L1, divided by the groups of the row)."""
    trl_args, ours = trl_case(**CASE)
    want = trl_uld("bayesian", False)(**trl_args)
    mq, mp = our_groups_l1(ours, CASE["s_ends"], CASE["t_ends"], "bayesian")
    assert torch.allclose(sorted_l1(mq.exp(), mp.exp()).mean(), want, atol=1e-10)


def test_uld_observed_is_trls_observed_one_position_earlier():
    """TRL's ``observed`` slices the logits at the answer tokens themselves (gold_trainer.py:465-466), so its
    distribution at a group's first token predicts the token *after* it and each later token's probability is read
    from the distribution predicting the next one. Ours reads the distribution predicting each token (the causal
    shift). The two agree when TRL is given logits shifted by one position, which is what this test feeds it."""
    trl_args, ours = trl_case(**CASE)
    for key in ("student_logits", "teacher_logits"):
        trl_args[key] = torch.cat([trl_args[key][:, :1], trl_args[key][:, :-1]], 1)   # position t holds P(x_t | x<t)
    want = trl_uld("observed", False)(**trl_args)
    mq, mp = our_groups_l1(ours, CASE["s_ends"], CASE["t_ends"], "observed")
    assert torch.allclose(sorted_l1(mq.exp(), mp.exp()).mean(), want, atol=1e-10)
    unshifted, _ = trl_case(**CASE)
    assert not torch.allclose(trl_uld("observed", False)(**unshifted), want)   # the difference is real


def test_gold_hybrid_equals_trls_where_the_vocabularies_spell_alike(tokenizer):
    """Two byte-level tokenizers (4096 and 1024 entries): matching by spelling (TRL, gold_trainer.py:350-380) and
    by bytes (ours) give the same pairs; the hybrid (:625-722, JSD on matched ids with TRL's 1e-8 clamp, which
    these moderate logits never reach) equals ours."""
    from lmdistill.models.tokenizer import train_tokenizer

    small = train_tokenizer(1024, limit=2000)
    t_ids, s_ids = matched_ids(tokenizer, small, TokenBytes(tokenizer), TokenBytes(small))
    loss = trl_uld("bayesian", True, tokenizer, small)
    assert sorted(zip(t_ids, s_ids)) == sorted(loss._vocab_mapping.items())
    case = dict(CASE, vs=len(tokenizer), vt=len(small))
    trl_args, ours = trl_case(**case)
    want = loss(**trl_args)
    mq, mp = our_groups_l1(ours, case["s_ends"], case["t_ends"], "bayesian")
    got = hybrid(mq, mp, (torch.tensor(t_ids), torch.tensor(s_ids)), beta=0.5).mean()
    assert torch.allclose(got, want.double(), atol=1e-6)
