"""``lmdistill serve``: the OpenAI-compatible server on a micro model, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lmdistill.cli import main
from lmdistill.clients import RequestRejected, make_client
from lmdistill.models import load_model_and_tokenizer
from lmdistill.decoding import ChatEngine
from lmdistill.serve import ServerThread, create_app, free_port

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def served(model_dirs):
    model, tok = load_model_and_tokenizer(model_dirs["student"])
    app = create_app(model, tok, model_name="micro", api_key=KEY, max_tokens_limit=64, default_max_tokens=8)
    with ServerThread(app) as srv:
        srv.engine = ChatEngine(model, tok)
        yield srv


def post(srv, body=None, *, content=None, headers=AUTH):
    kw = {"content": content} if content is not None else {"json": body}
    return httpx.post(f"{srv.base_url}/chat/completions", headers=headers, timeout=30, **kw)


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_models_and_key_check(served):
    r = httpx.get(f"{served.base_url}/models", headers=AUTH)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "micro"
    assert_error(httpx.get(f"{served.base_url}/models"), 401)
    err = assert_error(post(served, {"messages": MSG}, headers={"Authorization": "Bearer wrong"}), 401)
    assert err["code"] == "invalid_api_key"
    assert_error(post(served, {"messages": MSG}, headers={"Authorization": KEY}), 401)  # no Bearer scheme


def test_completion_is_greedy_and_matches_engine(served):
    body = {"model": "micro", "messages": MSG, "max_tokens": 12, "temperature": 0}
    a, b = post(served, body).json(), post(served, body).json()
    assert a["object"] == "chat.completion" and a["choices"][0]["message"]["role"] == "assistant"
    text = a["choices"][0]["message"]["content"]
    assert text == b["choices"][0]["message"]["content"]
    assert text == served.engine.complete(MSG, max_tokens=12).text
    assert a["usage"]["completion_tokens"] <= 12 and a["usage"]["prompt_tokens"] > 0
    assert a["choices"][0]["finish_reason"] in ("stop", "length")


def test_sampling_with_seed_is_reproducible(served):
    body = {"messages": MSG, "max_tokens": 10, "temperature": 1.0, "seed": 7}
    texts = {post(served, body).json()["choices"][0]["message"]["content"] for _ in range(2)}
    assert len(texts) == 1


def test_streaming_matches_non_streaming(served):
    body = {"messages": MSG, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{served.base_url}/chat/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[len("data: "):]) for l in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1 and chunks[-1]["usage"]["completion_tokens"] <= 12
    plain = post(served, {**body, "stream": False}).json()["choices"][0]["message"]["content"]
    assert content == plain


def test_openai_package_streaming_and_plain(served):
    import openai

    client = openai.OpenAI(api_key=KEY, base_url=served.base_url, max_retries=0)
    plain = client.chat.completions.create(model="micro", messages=MSG, max_tokens=6, temperature=0)
    stream = client.chat.completions.create(model="micro", messages=MSG, max_tokens=6, temperature=0, stream=True)
    pieces = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert pieces == plain.choices[0].message.content
    client.close()


@pytest.mark.parametrize("body,param", [
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0]"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": MSG, "max_tokens": 65}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "max_tokens": "5"}, "max_tokens"),
    ({"messages": MSG, "max_completion_tokens": 1000}, "max_completion_tokens"),
    ({"messages": MSG, "temperature": "hot"}, "temperature"),
    ({"messages": MSG, "temperature": 3}, "temperature"),
    ({"messages": MSG, "top_p": 0}, "top_p"),
    ({"messages": MSG, "n": 2}, "n"),
    ({"messages": MSG, "stream": "yes"}, "stream"),
    ({"messages": MSG, "stop": [1]}, "stop"),
    ({"messages": MSG, "seed": 1.5}, "seed"),
    ([1, 2], None),
])
def test_malformed_requests_get_400(served, body, param):
    assert_error(post(served, body), 400, param)


def test_bad_json_unknown_model_route_and_long_prompt(served):
    assert_error(post(served, content=b'{"messages": [', headers={**AUTH, "content-type": "application/json"}), 400)
    assert_error(post(served, content=b"\xff\xfe", headers=AUTH), 400)
    assert assert_error(post(served, {"model": "gpt-4", "messages": MSG}), 404, "model")["code"] == "model_not_found"
    assert_error(httpx.get(f"{served.url}/v1/nothing", headers=AUTH), 404)
    assert_error(httpx.get(f"{served.base_url}/chat/completions", headers=AUTH), 405)
    long = [{"role": "user", "content": "word " * 3000}]
    assert assert_error(post(served, {"messages": long, "max_tokens": 8}), 400)["code"] == "context_length_exceeded"


def test_concurrent_requests_are_serialised_safely(served):
    body = {"messages": MSG, "max_tokens": 10, "temperature": 0}
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda _: post(served, body).json()["choices"][0]["message"]["content"], range(6)))
    assert len(set(texts)) == 1


def test_truncate_prompt_and_body_limit_options(model_dirs):
    model, tok = load_model_and_tokenizer(model_dirs["student"])
    app = create_app(model, tok, model_name="m", max_tokens_limit=16, truncate_prompt=True)
    with ServerThread(app) as srv:
        r = httpx.post(f"{srv.base_url}/chat/completions", json={"messages": [{"role": "user", "content": "w " * 3000}],
                                                                 "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] <= 1024 - 4
    with ServerThread(create_app(model, tok, model_name="m", max_body_bytes=1000)) as srv:
        r = httpx.post(f"{srv.base_url}/chat/completions", json={"messages": [{"role": "user", "content": "w " * 600}]})
        assert_error(r, 413)["code"] == "request_too_large"


def test_stop_strings_in_plain_and_streamed_answers(served):
    full = post(served, {"messages": MSG, "max_tokens": 12, "temperature": 0}).json()["choices"][0]["message"]["content"]
    stop = full[3:9]  # a stop string that starts inside the answer
    body = {"messages": MSG, "max_tokens": 12, "temperature": 0, "stop": stop}
    plain = post(served, body).json()["choices"][0]
    assert plain["message"]["content"] == full[:full.find(stop)] and plain["finish_reason"] == "stop"
    with httpx.stream("POST", f"{served.base_url}/chat/completions", json={**body, "stream": True}, headers=AUTH) as r:
        chunks = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: {")]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == plain["message"]["content"]


def test_abandoned_stream_does_not_block_the_model(served):
    body = {"messages": MSG, "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.base_url}/chat/completions", json=body, headers=AUTH) as r:
        next(r.iter_lines())  # read one event, then hang up
    r = post(served, {"messages": MSG, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200


def test_serve_cli_rejects_bad_limit(model_dirs, capsys):
    assert main(["serve", model_dirs["student"], "--max-tokens-limit", "0"]) == 2
    assert "--max-tokens-limit" in capsys.readouterr().err


def test_serve_command_runs_a_real_server(model_dirs):
    import subprocess
    import sys
    import time

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmdistill", "serve", model_dirs["student"], "--port", str(port),
                             "--api-key", "s3cret", "--model-name", "stu", "--max-tokens-limit", "16"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"{base}/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        client = make_client(f"openai:stu@{base}", api_key="s3cret")
        assert isinstance(client.chat(MSG, max_tokens=4), str)
        try:
            client.chat(MSG, max_tokens=17)
            raise AssertionError("max_tokens above the limit was accepted")
        except RequestRejected as e:
            assert e.status == 400
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        proc.stderr.close()
