"""The server bounds itself (issue 18): body limit (413, declared or chunked), a prompt-length bound checked
before tokenizing, work off the event loop, chat ``logprobs``, and no parameter silently ignored."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lmdistill.cli import main
from lmdistill.models import load_model_and_tokenizer
from lmdistill.decoding import ChatEngine, ContextLengthError
from lmdistill.decoding.token_text import chars_per_token_bound
from lmdistill.serve import ServerThread, create_app
from lmdistill.serve.body import DRAIN_BYTES, MIN_BODY_BYTES, default_max_body_bytes

MSG = [{"role": "user", "content": "Who are you?"}]
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def loaded(model_dirs):
    model, tok = load_model_and_tokenizer(model_dirs["teacher"])
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def served(loaded):
    """A default-limit server (1 MiB for the micro model's 1024 positions)."""
    model, tok = loaded
    app = create_app(model, tok, model_name="micro", max_tokens_limit=64)
    with ServerThread(app) as srv:
        srv.app, srv.model, srv.tok = app, model, tok
        yield srv


@pytest.fixture(scope="module")
def small_limit(loaded):
    model, tok = loaded
    with ServerThread(create_app(model, tok, model_name="micro", max_body_bytes=LIMIT, api_key="k")) as srv:
        yield srv


def chat(srv, body, **kw):
    return httpx.post(f"{srv.base_url}/chat/completions", json=body, timeout=60, **kw)


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# ---- the body limit -------------------------------------------------------------------------------------------

def test_default_body_limit_follows_the_context(loaded):
    model, _ = loaded
    assert default_max_body_bytes(model) == max(MIN_BODY_BYTES, 16 * model.config.max_position_embeddings)
    model.config.max_position_embeddings, before = 1 << 20, model.config.max_position_embeddings
    try:
        assert default_max_body_bytes(model) == 16 << 20
    finally:
        model.config.max_position_embeddings = before


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_oversized_body_with_content_length_gets_413_not_a_reset(small_limit, path):
    body = b'{"prompt": "' + b"x" * (8 * LIMIT) + b'"}'
    r = httpx.post(small_limit.base_url + path, content=body, timeout=60, headers={"Authorization": "Bearer k"})
    err = error_of(r, 413)
    assert err["code"] == "request_too_large" and str(LIMIT) in err["message"]


def test_oversized_chunked_body_gets_413(small_limit):
    sent = []

    def chunks():  # no Content-Length: httpx sends Transfer-Encoding: chunked
        for _ in range(32):
            sent.append(1)
            yield b"x" * 16384

    r = httpx.post(f"{small_limit.base_url}/chat/completions", content=chunks(), timeout=60,
                   headers={"Authorization": "Bearer k"})
    assert error_of(r, 413)["code"] == "request_too_large"
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers


def test_bad_key_with_a_big_body_gets_401_not_a_reset(small_limit):
    r = httpx.post(f"{small_limit.base_url}/chat/completions", content=b"x" * (4 << 20), timeout=60)
    assert error_of(r, 401)["code"] == "invalid_api_key"


def test_a_body_that_never_ends_is_not_buffered(loaded):
    """At the ASGI level: a chunked body of endless 1 MiB chunks is answered 413 after reading at most the limit
    plus DRAIN_BYTES, holding at most one chunk past the limit (the chunks are dropped)."""
    model, tok = loaded
    app = create_app(model, tok, model_name="micro", max_body_bytes=LIMIT)
    chunk = b"x" * (1 << 20)
    received, sent = [0], []

    async def receive():
        received[0] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "headers": [(b"transfer-encoding", b"chunked")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "root_path": ""}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 413
    assert received[0] <= LIMIT + DRAIN_BYTES + 2 * len(chunk)
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert body["error"]["code"] == "request_too_large"


def test_serve_cli_rejects_a_bad_body_limit(model_dirs, capsys):
    assert main(["serve", model_dirs["teacher"], "--max-body-bytes", "0"]) == 2
    assert "--max-body-bytes" in capsys.readouterr().err


# ---- the cheap prompt-length bound ----------------------------------------------------------------------------

class CountingTokenizer:
    """The tokenizer, counting the texts it is asked to tokenize."""

    def __init__(self, tok):
        self._tok, self.calls = tok, []

    def __call__(self, text, *args, **kwargs):
        self.calls.append(len(text))
        return self._tok(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.fixture
def spy(served):
    engine = served.app.state.engine
    counting = CountingTokenizer(engine.tokenizer)
    engine.tokenizer = counting
    yield counting
    engine.tokenizer = counting._tok


def test_the_bound_holds_for_awkward_text(loaded):
    _, tok = loaded
    bound = chars_per_token_bound(tok)
    assert bound is not None and bound >= max(len(t) for t in tok.get_vocab())
    for text in ["a" * 5000, " " * 5000, "e\u0301" * 2000, "\u1100\u1161\u11a8" * 1000, "<|end|>" * 500,
                 "\U0001F600" * 1000, "the quick brown fox " * 300, "0123456789" * 400]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(text) <= bound * len(ids), text[:20]


def test_a_tokenizer_that_drops_text_gets_no_bound():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # drops whitespace: "a" + spaces is one token
    assert chars_per_token_bound(PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")) is None


def test_huge_chat_prompt_is_refused_without_tokenizing(served, spy):
    engine = served.app.state.engine
    huge = "hello world " * (engine.max_positions * engine.max_chars_per_token // 12 + 10)
    assert len(huge.encode()) < served.app.state.max_body_bytes  # not a 413
    err = error_of(chat(served, {"messages": [{"role": "user", "content": huge}], "max_tokens": 4}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert spy.calls == []
    # just over the context: tokenized (not refused by the bound), and refused by the exact count
    err = error_of(chat(served, {"messages": [{"role": "user", "content": "hello world " * 1100}], "max_tokens": 4}),
                   400)
    assert err["code"] == "context_length_exceeded" and len(spy.calls) == 1


def test_huge_completions_prompt_is_refused_without_tokenizing(served, spy):
    engine = served.app.state.engine
    huge = "x" * (engine.max_positions * engine.max_chars_per_token + 1)
    r = httpx.post(f"{served.base_url}/completions", json={"prompt": ["Hi", huge], "max_tokens": 4}, timeout=60)
    err = error_of(r, 400)
    assert err["code"] == "context_length_exceeded" and "prompt[1]" in err["message"]
    assert spy.calls == [2]  # only "Hi"


def test_truncation_tokenizes_only_the_tail_and_keeps_the_same_last_tokens(loaded):
    model, tok = loaded
    engine = ChatEngine(model, tok, truncate_prompt=True)
    text = "The cat sat on the mat. " * (engine.max_positions * engine.max_chars_per_token // 24 + 50)
    room = engine.max_positions - 8
    full = tok(text, add_special_tokens=False)["input_ids"]
    got = engine.fit(engine.encode(text, 8, truncate=True), 8, truncate=True)
    assert got == full[-room:]
    with pytest.raises(ContextLengthError):
        ChatEngine(model, tok).encode(text, 8)


# ---- off the event loop ---------------------------------------------------------------------------------------

def test_small_requests_are_answered_while_a_big_one_is_tokenized(served):
    """The big request's tokenization blocks until released: /health and a small chat must be answered meanwhile
    (on the event loop they would wait for it)."""
    engine = served.app.state.engine
    release, entered = threading.Event(), threading.Event()
    real = engine.tokenizer

    class Blocking(CountingTokenizer):
        def __call__(self, text, *args, **kwargs):
            if len(text) > 2000:
                entered.set()
                assert release.wait(60)
            return real(text, *args, **kwargs)

    engine.tokenizer = Blocking(real)
    pool = ThreadPoolExecutor(1)
    try:
        big = pool.submit(chat, served, {"messages": [{"role": "user", "content": "w " * 1500}], "max_tokens": 2})
        assert entered.wait(60)
        assert httpx.get(f"{served.url}/health", timeout=30).status_code == 200
        assert chat(served, {"messages": MSG, "max_tokens": 2}).status_code == 200
        assert not big.done()
        release.set()
        assert big.result().status_code in (200, 400)
    finally:
        release.set()
        pool.shutdown()
        engine.tokenizer = real


def test_small_requests_are_answered_while_a_big_one_generates(served):
    engine = served.app.state.engine
    release, entered = threading.Event(), threading.Event()
    real = engine.complete_ids

    def slow(ids, **kw):
        if len(ids) > 100:
            entered.set()
            assert release.wait(60)
        return real(ids, **kw)

    engine.complete_ids = slow
    pool = ThreadPoolExecutor(1)
    try:
        big = pool.submit(chat, served, {"messages": [{"role": "user", "content": "w " * 400}], "max_tokens": 2})
        assert entered.wait(60)
        assert httpx.get(f"{served.url}/health", timeout=30).status_code == 200
        assert chat(served, {"messages": MSG, "max_tokens": 2}).status_code == 200
        with httpx.stream("POST", f"{served.base_url}/chat/completions", timeout=30,
                          json={"messages": MSG, "max_tokens": 2, "stream": True}) as r:
            assert [l for l in r.iter_lines() if l][-1] == "data: [DONE]"
        assert not big.done()
        release.set()
        assert big.result().status_code == 200
    finally:
        release.set()
        pool.shutdown()
        del engine.complete_ids


# ---- chat logprobs --------------------------------------------------------------------------------------------

def _greedy_reference(model, ids: list[int], steps: int) -> list[tuple[int, torch.Tensor]]:
    """(greedy token, log_softmax row) per step, each from a full forward pass without a cache."""
    out, seq = [], list(ids)
    with torch.inference_mode():
        for _ in range(steps):
            lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, -1].float(), dim=-1)
            tok = int(lp.argmax())
            out.append((tok, lp))
            seq.append(tok)
    return out


def test_chat_logprobs_equal_the_models_log_softmax(served):
    engine = served.app.state.engine
    body = {"messages": MSG, "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 5}
    r = chat(served, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert 0 < len(content) <= 10
    ref = _greedy_reference(served.model, engine.prompt_ids(MSG, 10), len(content))
    for entry, (tok, lp) in zip(content, ref):
        assert entry["token"] == engine.piece(tok)
        assert entry["logprob"] == pytest.approx(float(lp[tok]), abs=1e-5)
        assert entry["bytes"] == engine.token_bytes(tok)
        vals, idx = lp.topk(5)
        assert [t["token"] for t in entry["top_logprobs"]] == [engine.piece(i) for i in idx.tolist()]
        for t, v in zip(entry["top_logprobs"], vals.tolist()):
            assert t["logprob"] == pytest.approx(v, abs=1e-5) and isinstance(t["bytes"], list)
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)  # greedy
    ids = [tok for tok, _ in ref]
    assert b"".join(bytes(e["bytes"]) for e in content) == b"".join(bytes(engine.token_bytes(t)) for t in ids)
    special = set(served.tok.all_special_ids) | set(served.tok.added_tokens_decoder)
    plain = [t for t in ids if t not in special]
    assert b"".join(bytes(engine.token_bytes(t)) for t in plain).decode("utf-8", "replace") == \
        served.tok.decode(plain, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_streamed_logprobs_equal_the_plain_ones(served):
    body = {"messages": MSG, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    plain = chat(served, body).json()["choices"][0]
    with httpx.stream("POST", f"{served.base_url}/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: {")]
    streamed = [e for c in chunks if c["choices"] for e in (c["choices"][0]["logprobs"] or {}).get("content", [])]
    assert streamed == plain["logprobs"]["content"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["message"]["content"]


def test_top_logprobs_zero_and_no_logprobs(served):
    r = chat(served, {"messages": MSG, "max_tokens": 4, "temperature": 0, "logprobs": True})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content and all(e["top_logprobs"] == [] for e in content)
    assert chat(served, {"messages": MSG, "max_tokens": 4}).json()["choices"][0]["logprobs"] is None


# ---- every parameter honoured or refused ----------------------------------------------------------------------

@pytest.mark.parametrize("extra, param", [
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"repetition_penalty": 1.3}, "repetition_penalty"),
    ({"echo": True}, "echo"),
    ({"best_of": 2}, "best_of"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"user": 5}, "user"),
])
def test_unsupported_chat_parameters_are_refused_by_name(served, extra, param):
    err = error_of(chat(served, {"messages": MSG, "max_tokens": 2, **extra}), 400)
    assert err["param"] == param and param.split(".")[-1] in err["message"]


def test_neutral_values_and_harmless_parameters_are_accepted(served):
    body = {"messages": MSG, "max_tokens": 3, "temperature": 0, "user": "u-1", "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "response_format": {"type": "text"}, "tools": [],
            "tool_choice": "none", "logprobs": False}
    r = chat(served, body)
    assert r.status_code == 200, r.text
    base = chat(served, {"messages": MSG, "max_tokens": 3, "temperature": 0}).json()["choices"][0]["message"]
    assert r.json()["choices"][0]["message"] == base
