"""Every prompt gets the tokenizer's default prefix exactly once (Gemma's ``<bos>``); responses never; tokenizers that
add nothing (the micro one, SmolLM2's) give the ids they gave before. Trained students carry their source's terms.

The BOS tokenizer here is the micro tokenizer with the post-processor Gemma-3's ``tokenizer.json`` has:
``TemplateProcessing(single="<bos> $A")`` (tokenizer() adds it, ``add_special_tokens=False`` does not).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import processors

from lmdistill.data import load_examples, tokenize_example, tokenize_examples
from lmdistill.data.prompt_prefix import add_prompt_prefix, encode_prompt, prompt_prefix_ids
from lmdistill.data.templates import format_prompt
from lmdistill.errors import ConfigError
from lmdistill.evaluate import predictors as predictors_mod
from lmdistill.models import load_model, load_tokenizer
from lmdistill.models.tokenizer import CHAT_TEMPLATE
from lmdistill.quantify import whitebox
from lmdistill.decoding import ChatEngine
from test_gemma3_real import gemma, log_probs, teacher_model  # noqa: F401  (the slow Gemma tests' session fixtures)

MESSAGES = [{"role": "user", "content": "Give three tips for staying healthy."}]


def _with_post_processor(tokenizer, folder: Path, single: str):
    tokenizer.save_pretrained(str(folder))
    tok = load_tokenizer(str(folder))        # a copy: the session's micro tokenizer stays as it is
    specials = {t: tok.convert_tokens_to_ids(t) for t in (tok.bos_token, tok.eos_token) if t in single}
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B:1", special_tokens=list(specials.items()))
    tok.save_pretrained(str(folder))
    return load_tokenizer(str(folder))       # as a model folder's tokenizer is loaded


@pytest.fixture(scope="module")
def tok_dirs(tokenizer, tmp_path_factory):
    """Tokenizer folders: ``micro`` (adds nothing) and ``bos`` (the micro one with Gemma-3's ``<bos> $A``)."""
    root = tmp_path_factory.mktemp("toks")
    tokenizer.save_pretrained(str(root / "micro"))
    _with_post_processor(tokenizer, root / "bos", f"{tokenizer.bos_token} $A")
    return {"micro": str(root / "micro"), "bos": str(root / "bos")}


@pytest.fixture(scope="module")
def bos_tok(tok_dirs):
    return load_tokenizer(tok_dirs["bos"])


@pytest.fixture(scope="module")
def bos_dirs(model_dirs, bos_tok, tmp_path_factory):
    """The micro teacher and student folders with the BOS tokenizer."""
    root = tmp_path_factory.mktemp("bos-models")
    out = {}
    for name in ("teacher", "student"):
        out[name] = root / name
        shutil.copytree(model_dirs[name], out[name])
        bos_tok.save_pretrained(str(out[name]))
    return {k: str(v) for k, v in out.items()}


def old_prompt_ids(text, tok):
    """The formula every path used before: the text without special tokens."""
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prefix_is_what_the_tokenizer_puts_before_text(tokenizer, bos_tok, tmp_path):
    bos = bos_tok.bos_token_id
    assert prompt_prefix_ids(tokenizer) == [] and prompt_prefix_ids(bos_tok) == [bos]
    eos_only = _with_post_processor(tokenizer, tmp_path / "eos", f"$A {tokenizer.eos_token}")
    assert eos_only("Hi")["input_ids"][-1] == eos_only.eos_token_id
    assert prompt_prefix_ids(eos_only) == []                        # what follows the text is no prefix
    both = _with_post_processor(tokenizer, tmp_path / "both", f"{tokenizer.bos_token} $A {tokenizer.eos_token}")
    assert prompt_prefix_ids(both) == [bos]
    for text in ["Hi", "Hello world. Say it back.", "  spaced\n\nlines ", ""]:
        assert encode_prompt(text, tokenizer) == old_prompt_ids(text, tokenizer)
        assert encode_prompt(text, bos_tok) == [bos] + old_prompt_ids(text, bos_tok)
        if text:
            assert encode_prompt(text, bos_tok) == bos_tok(text)["input_ids"]   # the tokenizer's own default
    assert add_prompt_prefix([bos, 5, 6], bos_tok) == [bos, 5, 6]             # already there: not doubled
    assert add_prompt_prefix([5, bos, 6], bos_tok) == [bos, 5, bos, 6]


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_tokenized_rows_have_one_bos_before_the_prompt_and_none_in_the_response(bos_tok, tokenizer, template):
    exs = load_examples("dolly:train").examples[:6]
    bos = bos_tok.bos_token_id
    rows, _ = tokenize_examples(exs, bos_tok, template=template, max_prompt_length=10 ** 6, max_length=10 ** 6)
    old, _ = tokenize_examples(exs, tokenizer, template=template, max_prompt_length=10 ** 6, max_length=10 ** 6)
    for row, before, ex in zip(rows, old, exs):
        text = format_prompt(ex, template, bos_tok)
        assert row.prompt_ids == [bos] + old_prompt_ids(text, bos_tok) and row.input_ids.count(bos) == 1
        assert row.response_ids == old_prompt_ids(ex.output, bos_tok) + [bos_tok.eos_token_id]
        assert row.loss_mask == [0] * len(row.prompt_ids) + [1] * len(row.response_ids)
        assert before.prompt_ids == old_prompt_ids(text, tokenizer)                # micro: the ids of before
        assert before.response_ids == old_prompt_ids(ex.output, tokenizer) + [tokenizer.eos_token_id]
        assert tokenize_example(ex, bos_tok, template=template, max_length=10 ** 6).input_ids == row.input_ids


def test_a_chat_template_that_renders_bos_is_not_given_a_second(models, tok_dirs):
    tok = load_tokenizer(tok_dirs["bos"])           # a copy, its chat template changed
    tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    bos = tok.bos_token_id
    ex = load_examples("dolly:train").examples[0]
    rows, _ = tokenize_examples([ex], tok, template="chat")
    assert rows[0].prompt_ids[0] == bos and rows[0].input_ids.count(bos) == 1
    assert rows[0].prompt_ids == old_prompt_ids(format_prompt(ex, "chat", tok), tok)   # the template's own BOS
    engine = ChatEngine(models["teacher"], tok)
    ids = engine.prompt_ids(MESSAGES, 4)
    assert ids[0] == bos and ids.count(bos) == 1


def test_a_long_prompt_length_counts_the_bos(bos_tok, tokenizer):
    ex = load_examples("dolly:train").examples[0]
    n = len(old_prompt_ids(format_prompt(ex, "alpaca"), tokenizer))
    assert len(tokenize_examples([ex], tokenizer, max_prompt_length=n)[0]) == 1
    assert len(tokenize_examples([ex], bos_tok, max_prompt_length=n)[0]) == 0            # n + 1 tokens now
    assert len(tokenize_examples([ex], bos_tok, max_prompt_length=n + 1)[0]) == 1


@pytest.mark.parametrize("chat_template", [True, False])
def test_served_chat_prompts_start_with_one_bos(models, tok_dirs, chat_template):
    tok, micro = load_tokenizer(tok_dirs["bos"]), load_tokenizer(tok_dirs["micro"])   # copies: templates change
    bos = tok.bos_token_id
    if not chat_template:                                   # the plain-transcript path of a base model
        tok.chat_template = micro.chat_template = None
    engine, before = ChatEngine(models["teacher"], tok), ChatEngine(models["teacher"], micro)
    text = engine.prompt_text(MESSAGES)
    assert text.startswith("<|user|>" if chat_template else "user: ")
    assert engine.prompt_ids(MESSAGES, 4) == [bos] + old_prompt_ids(text, tok)
    assert before.prompt_ids(MESSAGES, 4) == old_prompt_ids(text, micro)               # micro: as before
    # the raw /v1/completions path keeps its add_special_tokens flag (default True, as vLLM)
    assert engine.encode(text, 4, add_special_tokens=True) == [bos] + old_prompt_ids(text, tok)
    assert engine.encode(text, 4, add_special_tokens=False) == old_prompt_ids(text, tok)
    seen = []
    real = engine.prompt_ids
    engine.prompt_ids = lambda m, k: seen.append(real(m, k)) or seen[-1]
    engine.complete(MESSAGES, max_tokens=2, temperature=0)     # the decode path reads these ids
    assert seen and seen[0][0] == bos and seen[0].count(bos) == 1


def test_whitebox_scores_prompts_with_one_bos(bos_dirs, model_dirs, tokenizer, monkeypatch):
    bos_tok = load_tokenizer(bos_dirs["teacher"])
    bos = bos_tok.bos_token_id
    assert whitebox._prompt_ids(bos_tok, "Hi") == [bos] + old_prompt_ids(bos_tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True), bos_tok)
    assert whitebox._prompt_ids(tokenizer, "Hi") == old_prompt_ids(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True), tokenizer)
    seqs, real = [], whitebox.compare_many
    monkeypatch.setattr(whitebox, "compare_many", lambda t, s, rows: seqs.extend(rows) or real(t, s, rows))
    items = [{"id": "a", "prompt": "Hi", "reference": "Hello there."},
             {"id": "b", "prompt": "Name a fruit.", "reference": "An apple."}]
    out = whitebox.run_whitebox(bos_dirs["teacher"], bos_dirs["student"], items, max_new_tokens=4,
                                use_references=True, device="cpu", progress=False)
    assert len(out["items"]) == 2 and len(seqs) == 2
    for (ids, plen), it in zip(seqs, items):
        assert ids[0] == bos and ids.count(bos) == 1
        assert ids[plen:] == old_prompt_ids(it["reference"], bos_tok)[:4]


def test_eval_predictor_prompts_start_with_one_bos_and_truncation_keeps_it(models, bos_tok, tokenizer):
    exs = load_examples("sni").examples[:4]
    bos = bos_tok.bos_token_id
    pred = predictors_mod.LocalPredictor.from_model(models["student"], bos_tok)
    items, report = pred.prepare(exs, 256)
    full = [[bos] + old_prompt_ids(format_prompt(e, "alpaca"), bos_tok) for e in exs]
    assert [it.prompt_ids for it in items] == [ids[:256] for ids in full]
    assert report.truncated and all(it.prompt_ids[0] == bos and it.prompt_ids.count(bos) == 1 for it in items)
    before, _ = predictors_mod.LocalPredictor.from_model(models["student"], tokenizer).prepare(exs, 256)
    assert [it.prompt_ids for it in before] == [old_prompt_ids(format_prompt(e, "alpaca"), tokenizer)[:256]
                                                for e in exs]


def test_capture_stores_rows_with_the_bos(bos_dirs, tmp_path):
    from lmdistill.cli import main
    from lmdistill.teachers import TeacherCache

    out = tmp_path / "cache"
    assert main(["capture", "--teacher", bos_dirs["teacher"], "--data", "dolly:train", "--out", str(out),
                 "--limit", "3", "--top-k", "8", "--template", "alpaca", "--max-length", "96",
                 "--max-prompt-length", "80", "--no-progress"]) == 0
    tok = load_tokenizer(bos_dirs["teacher"])
    rows, _ = tokenize_examples(load_examples("dolly:train").examples[:3], tok, max_prompt_length=80, max_length=96)
    cache = TeacherCache(out)
    assert len(cache) == len(rows) >= 1
    for row in rows:
        assert row.input_ids[0] == tok.bos_token_id
        cache.row(row.input_ids, row.loss_mask, row.id)       # found: the capture scored these very ids
        with pytest.raises(ConfigError, match="not in cache"):
            cache.row(row.input_ids[1:], row.loss_mask[1:], row.id)   # the ids without BOS were not captured


def test_train_exports_carry_the_students_license_files(model_dirs, tmp_path):
    from lmdistill.train import load_config, train

    student = tmp_path / "student"
    shutil.copytree(model_dirs["student"], student)
    (student / "LICENSE").write_text("Gemma is provided under and subject to the Gemma Terms of Use.\n")
    (student / "GEMMA_TERMS.html").write_bytes("<html>terms \u00e9\r\n</html>".encode("utf-8") + bytes([0xFF]))
    (student / "NOTES.md").write_text("not a license file")
    out = tmp_path / "run"
    cfg = load_config("sft", [f"student={student}", f"output_dir={out}", "max_train_examples=4", "max_steps=2",
                              "batch_size=2", "micro_batch_size=2", "valid_data=dolly:valid", "eval_limit=2",
                              "eval_steps=2", "eval_max_new_tokens=4", "max_length=64", "max_prompt_length=48",
                              "save_steps=1000", "progress=false", "device=cpu"])
    train(cfg)
    for name in ("final", "best"):
        folder = out / name
        assert (folder / "model.safetensors").is_file(), name
        for f in ("LICENSE", "GEMMA_TERMS.html"):
            assert (folder / f).read_bytes() == (student / f).read_bytes(), (name, f)
        assert not (folder / "NOTES.md").exists()
        assert load_model(str(folder)).config.num_hidden_layers == load_model(str(student)).config.num_hidden_layers


@pytest.mark.slow
def test_gemma_rows_score_dolly_with_the_bos(gemma, teacher_model):
    """Gemma-3-270M on the rows lmdistill builds for six Dolly train examples: each prompt is what Gemma's tokenizer
    gives by default (``<bos>`` first), and the loss per response token is the with-BOS value (measured 2.96 nats;
    4.44 with the same rows' ``<bos>`` removed, as every path encoded them before)."""
    model, tok = teacher_model
    exs = load_examples("dolly:train").examples[:6]
    rows, _ = tokenize_examples(exs, tok, template="alpaca")
    assert len(rows) == 6
    for row, ex in zip(rows, exs):
        assert row.prompt_ids == tok(format_prompt(ex, "alpaca"))["input_ids"] and row.prompt_ids[0] == 2
        assert row.input_ids.count(tok.bos_token_id) == 1

    def nats_per_token(seqs):
        total = count = 0
        for ids, start in seqs:                 # float64 log-softmax of the model's own logits (log_probs)
            lp = log_probs(model, ids)[start - 1:-1]
            total -= lp.gather(1, torch.tensor(ids[start:])[:, None]).sum().item()
            count += len(ids) - start
        return total / count

    with_bos = nats_per_token([(r.input_ids, len(r.prompt_ids)) for r in rows])
    without = nats_per_token([(r.input_ids[1:], len(r.prompt_ids) - 1) for r in rows])
    assert 2.6 < with_bos < 3.3 and without > with_bos + 1.0, (with_bos, without)
