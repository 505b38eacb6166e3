"""Chat clients and the response cache against real HTTP servers: retries, auth, concurrency, crash safety."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import pytest

from lmdistill.clients import (AuthenticationFailed, CachedClient, ClientError, RequestRejected, ResponseCache,
                               RetriesExhausted, RetryPolicy, make_client)
from lmdistill.errors import ConfigError
from lmdistill.models import load_model_and_tokenizer
from lmdistill.serve import ServerThread, create_app
from lmdistill.serve.testing import scripted_app


def echo(messages, body):
    return "echo: " + messages[-1]["content"]


def msg(text):
    return [{"role": "user", "content": text}]


def client_for(srv, **kw):
    kw = {"base_delay": 0.001, "max_delay": 0.01, "timeout": 2.0, **kw}
    return make_client(f"openai:scripted@{srv.base_url}", api_key="k", **kw)


def test_retries_on_500_429_and_hang_then_answers():
    plan = {0: 500, 1: 429, 2: 503, 3: ("hang", 3.0)}
    with ServerThread(scripted_app(echo, fault=lambda n, b: plan.get(n))) as srv:
        c = client_for(srv, timeout=0.5)
        assert c.chat(msg("hi")) == "echo: hi"
        assert c.attempts == 5
        assert [x["outcome"] for x in srv.server.config.app.state.calls] == [500, 429, 503, "hang", "ok"]


def test_retries_exhausted_and_auth_and_rejection_are_not_retried():
    with ServerThread(scripted_app(echo, fault=lambda n, b: 500)) as srv:
        c = client_for(srv, max_retries=3)
        with pytest.raises(RetriesExhausted, match="4 attempts"):
            c.chat(msg("x"))
        assert c.attempts == 4
    with ServerThread(scripted_app(echo, api_key="right")) as srv:
        c = client_for(srv)
        with pytest.raises(AuthenticationFailed, match="OPENAI_API_KEY"):
            c.chat(msg("x"))
        assert c.attempts == 1
    with ServerThread(scripted_app(echo, fault=lambda n, b: 400)) as srv:
        c = client_for(srv)
        with pytest.raises(RequestRejected):
            c.chat(msg("x"))
        assert c.attempts == 1


def _retry_lines(err: str) -> list[str]:
    return [re.sub(r"in [0-9.]+ s$", "in T s", line) for line in err.splitlines() if "waiting for" in line]


def test_each_retry_says_what_it_waits_for(capsys):
    with ServerThread(scripted_app(echo, fault=lambda n, b: 500)) as srv:
        with pytest.raises(RetriesExhausted, match="3 attempts"):
            client_for(srv, max_retries=2).chat(msg("x"))
        lines = _retry_lines(capsys.readouterr().err)
        assert len(lines) == 2 and all(line.startswith(f"[lmdistill] waiting for {srv.base_url}: 500") for line in lines)
        assert [line[-len("retry 1/2 in T s"):] for line in lines] == ["retry 1/2 in T s", "retry 2/2 in T s"]


def test_an_unreachable_server_fails_fast_naming_it(capsys):
    """Connection refused: 3 retries (1 + 2 + 4 s under the default policy, not the 63 s of 6 retries), each one
    said; the error names the address and asks whether a server runs there."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()   # nothing listens there now
    c = make_client(f"openai:m@{url}", api_key="k", base_delay=0.001, max_delay=0.01)   # max_retries: 6
    with pytest.raises(RetriesExhausted, match=re.escape(f"cannot connect to {url} (connection refused) after 4 "
                                                         "attempts")) as e:
        c.chat(msg("hi"))
    assert "is the server running at that address?" in str(e.value) and c.attempts == 4
    assert _retry_lines(capsys.readouterr().err) == [
        f"[lmdistill] waiting for {url}: connection refused, retry {k}/3 in T s" for k in (1, 2, 3)]
    policy = RetryPolicy(jitter=0.0)
    assert (policy.max_connect_retries, sum(policy.delay(k) for k in range(3))) == (3, 7.0)
    c = make_client(f"openai:m@{url}", api_key="k", max_retries=0)   # --retries 0: no retry of any kind
    with pytest.raises(RetriesExhausted, match="refused\\) after 1 attempt over"):
        c.chat(msg("hi"))
    assert c.attempts == 1 and not _retry_lines(capsys.readouterr().err)


def test_key_from_named_env_var(monkeypatch):
    monkeypatch.setenv("MY_KEY", "right")
    with ServerThread(scripted_app(echo, api_key="right")) as srv:
        assert make_client(f"openai:s@{srv.base_url}", api_key_env="MY_KEY").chat(msg("a")) == "echo: a"


def test_retry_policy_backoff():
    p = RetryPolicy(base_delay=0.5, max_delay=3.0, jitter=0.0)
    assert [p.delay(i) for i in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert p.delay(0, retry_after=2.0) == 2.0


def test_chat_many_respects_concurrency_and_order():
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def slow(messages, body):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return messages[-1]["content"].upper()

    app = scripted_app(lambda m, b: "", fault=None)
    # route the slow responder through a thread so the event loop can serve requests concurrently
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") != "/v1/chat/completions"]

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        text = await asyncio.to_thread(slow, body["messages"], body)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "s",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}

    with ServerThread(app) as srv:
        c = client_for(srv, concurrency=3)
        out = c.chat_many([msg(f"q{i}") for i in range(12)])
    assert out == [f"Q{i}" for i in range(12)]
    assert 2 <= state["max"] <= 3


def test_cache_survives_faults_without_loss_or_duplicates(tmp_path):
    faults = {1: 500, 4: 429, 6: ("hang", 2.0), 9: 502, 12: 500}
    with ServerThread(scripted_app(echo, fault=lambda n, b: faults.get(n))) as srv:
        path = tmp_path / "cache.jsonl"
        c = client_for(srv, cache_path=path, concurrency=4, timeout=0.5)
        batch = [msg(f"q{i % 15}") for i in range(20)]  # 5 repeated requests
        out = c.chat_many(batch)
        assert out == [f"echo: q{i % 15}" for i in range(20)]
        calls = srv.server.config.app.state.calls
        answered = [json.dumps(x["messages"]) for x in calls if x["outcome"] == "ok"]
        assert len(answered) == len(set(answered)) == 15  # each distinct request paid once
        rows = [json.loads(l) for l in path.read_text().splitlines()]
        assert len(rows) == 15 and len({r["key"] for r in rows}) == 15
        c.cache.close()
        # a rerun asks nothing
        before = len(calls)
        c2 = client_for(srv, cache_path=path)
        assert c2.chat_many(batch) == out and len(calls) == before
        assert c2.hits == 20 and c2.misses == 0


def test_torn_cache_tail_is_repaired(tmp_path):
    with ServerThread(scripted_app(echo)) as srv:
        path = tmp_path / "c.jsonl"
        c = client_for(srv, cache_path=path)
        c.chat(msg("a"))
        c.chat(msg("b"))
        c.cache.close()
        with open(path, "a") as f:
            f.write('{"key": "half')  # a kill -9 in the middle of a write
        c2 = client_for(srv, cache_path=path)
        assert len(c2.cache) == 2 and c2.chat(msg("c")) == "echo: c"
        lines = path.read_text().splitlines()
        assert len(lines) == 3 and all(json.loads(l) for l in lines)


def test_rejected_requests_are_cached_and_reraised(tmp_path):
    with ServerThread(scripted_app(echo, fault=lambda n, b: 400)) as srv:
        c = client_for(srv, cache_path=tmp_path / "c.jsonl")
        for _ in range(2):
            with pytest.raises(RequestRejected):
                c.chat(msg("x"))
        assert len(srv.server.config.app.state.calls) == 1
        results = c.chat_many([msg("x"), msg("y")], return_exceptions=True)
        assert all(isinstance(r, RequestRejected) for r in results)


def test_local_client_matches_served_model(model_dirs):
    local = make_client(model_dirs["student"])
    assert local.name == model_dirs["student"]
    model, tok = load_model_and_tokenizer(model_dirs["student"])
    with ServerThread(create_app(model, tok, model_name="student")) as srv:
        remote = make_client(f"openai:student@{srv.base_url}")
        for text in ("Who made you?", "你是谁？"):
            assert local.chat(msg(text), max_tokens=10) == remote.chat(msg(text), max_tokens=10)


@pytest.mark.parametrize("spec", ["", "openai:model", "openai:@http://x", "openai:m@ftp://x"])
def test_bad_specs(spec):
    with pytest.raises(ClientError):
        make_client(spec)


def test_bad_messages_rejected_before_sending():
    with ServerThread(scripted_app(echo)) as srv:
        c = client_for(srv)
        for bad in ([], [{"role": "user"}], "hi"):
            with pytest.raises(ClientError):
                c.chat(bad)
        assert srv.server.config.app.state.calls == []


def test_cached_client_is_a_chat_client(tmp_path):
    with ServerThread(scripted_app(echo)) as srv:
        c = client_for(srv, cache_path=tmp_path / "c.jsonl")
        assert isinstance(c, CachedClient) and isinstance(c.cache, ResponseCache) and c.name.startswith("openai:")


def test_switches_to_max_completion_tokens_when_asked():
    def fault(n, body):
        if "max_tokens" in body:
            return (400, "Unsupported parameter: 'max_tokens' is not supported with this model. "
                         "Use 'max_completion_tokens' instead.")
        return None

    with ServerThread(scripted_app(echo, fault=fault)) as srv:
        c = client_for(srv)
        assert c.chat(msg("a"), max_tokens=5) == "echo: a" and c.chat(msg("b")) == "echo: b"
        calls = srv.server.config.app.state.calls
        assert [x["outcome"] for x in calls] == [400, "ok", "ok"]
        assert calls[1]["params"]["max_completion_tokens"] == 5


def test_corrupt_cache_line_is_a_clear_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"key": "a", "answer": "x"}\nnot json\n{"key": "b", "answer": "y"}\n')
    with pytest.raises(ConfigError, match="c.jsonl:2"):
        ResponseCache(path)


def test_equal_params_share_a_cache_entry(tmp_path):
    with ServerThread(scripted_app(echo)) as srv:
        c = client_for(srv, cache_path=tmp_path / "c.jsonl")
        c.chat(msg("a"), temperature=0, top_p=1)
        c.chat(msg("a"), temperature=0.0, top_p=1.0)
        assert len(srv.server.config.app.state.calls) == 1


def test_quota_exhausted_and_transient_4xx():
    with ServerThread(scripted_app(echo, fault=lambda n, b: (429, "You exceeded your quota", "insufficient_quota"))) as srv:
        c = client_for(srv)
        with pytest.raises(ClientError, match="quota"):
            c.chat(msg("x"))
        assert c.attempts == 1
    with ServerThread(scripted_app(echo, fault=lambda n, b: 408 if n == 0 else None)) as srv:
        c = client_for(srv)
        assert c.chat(msg("x")) == "echo: x" and c.attempts == 2
