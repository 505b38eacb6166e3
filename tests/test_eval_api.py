"""Evaluation of an API model through a real OpenAI-compatible HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from fastapi import FastAPI, Request  # module level: FastAPI resolves the string annotations here

from lmdistill.data import load_examples
from lmdistill.evaluate.run import evaluate_models
from lmdistill.models import load_model_and_tokenizer
from lmdistill.rouge import rouge_l
from lmdistill.serve.app import create_app
from lmdistill.serve.server import ServerThread


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def echo_server():
    """A chat-completions endpoint that answers with the user's message and records every request."""
    import uvicorn

    app = FastAPI()
    requests: list[dict] = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        requests.append({**body, "authorization": request.headers.get("authorization")})
        text = body["messages"][-1]["content"]
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": f"  {text}\n"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    server.install_signal_handlers = lambda: None
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "test server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", requests
    server.should_exit = True
    thread.join(timeout=10)


def _user_text(ex) -> str:
    return ex.instruction if not ex.input.strip() else f"{ex.instruction}\n\n{ex.input}"


def test_api_model_is_prompted_as_a_chat_and_scored(echo_server, tmp_path, monkeypatch):
    base_url, requests = echo_server
    requests.clear()
    monkeypatch.setenv("EVAL_TEST_KEY", "sk-test")
    res = evaluate_models([f"echo=openai:echo-model@{base_url}"], ["sni", "vicuna"], [10, 20], tmp_path,
                          limit=4, api_key_env="EVAL_TEST_KEY", progress=False)
    model = res["models"]["echo"]
    assert model["kind"] == "api" and model["source"] == f"openai:echo-model@{base_url}"
    assert len(requests) == 2 * 2 * 4  # benchmarks x seeds x examples: no prompt is dropped for API models
    assert {r["authorization"] for r in requests} == {"Bearer sk-test"}
    assert {(r["model"], r["temperature"], r["top_p"], r["max_tokens"]) for r in requests} == {("echo-model", 1.0, 1.0, 256)}
    sni = load_examples("sni").examples[:4]
    sent = [r["messages"] for r in requests]
    assert all(sent.count([{"role": "user", "content": _user_text(e)}]) == 2 for e in sni)  # two seeds each
    # one seed per example and run seed: seeds 10 and 20 send different seeds for the same example
    seeds_by_example: dict[str, set] = {}
    for r in requests:
        seeds_by_example.setdefault(r["messages"][0]["content"], set()).add(r["seed"])
    assert all(len(s) == 2 for s in seeds_by_example.values())

    entry = model["benchmarks"]["sni"]
    assert entry["n"] == 4 and entry["dropped"] == 0
    expected = sum(rouge_l(_user_text(e), e.references) for e in sni) / 4
    assert entry["seeds"]["10"] == pytest.approx(expected) and entry["std"] == pytest.approx(0.0)
    rows = [json.loads(x) for x in (tmp_path / "predictions/echo/sni/seed10.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == [_user_text(e) for e in sni]  # stripped
    assert "tokens" not in rows[0]

    # an interrupted seed is redone from the response cache: no request is sent (or paid) twice
    (tmp_path / "predictions/echo/sni/seed20.meta.json").unlink()
    requests.clear()
    again = evaluate_models([f"echo=openai:echo-model@{base_url}"], ["sni", "vicuna"], [10, 20], tmp_path,
                            limit=4, api_key_env="EVAL_TEST_KEY", progress=False)
    assert requests == [] and again["models"] == res["models"]
    assert (tmp_path / "predictions/echo/api_requests.jsonl").exists()


def test_api_greedy_and_several_samples(echo_server, tmp_path, monkeypatch):
    base_url, requests = echo_server
    requests.clear()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-other")
    res = evaluate_models([f"openai:echo-model@{base_url}"], ["vicuna"], [10, 20, 30], tmp_path, limit=2,
                          greedy=True, num_samples=2, max_new_tokens=32, progress=False)
    assert res["settings"]["seeds"] == [10]  # greedy decoding runs one seed
    assert len(requests) == 2 * 2 and {r["temperature"] for r in requests} == {0.0}
    assert {r["max_tokens"] for r in requests} == {32}
    assert len({r["seed"] for r in requests}) == 4  # per example and sample
    rows = [json.loads(x) for x in (tmp_path / "predictions/echo-model/vicuna/seed10.jsonl").read_text().splitlines()]
    assert len(rows[0]["outputs"]) == 2 and rows[0]["rougeL"] == pytest.approx(sum(rows[0]["rougeL_samples"]) / 2)
    assert res["models"]["echo-model"]["benchmarks"]["vicuna"]["best_of_k"]["10"] == pytest.approx(
        sum(max(r["rougeL_samples"]) for r in rows) / 2)


def test_against_lmdistill_serve_seeds_repeat(model_dirs, tmp_path, monkeypatch):
    """The whole API path against our own OpenAI-compatible server serving a micro model."""
    model, tok = load_model_and_tokenizer(model_dirs["student"])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-serve")
    with ServerThread(create_app(model, tok, model_name="micro", api_key="sk-serve")) as srv:
        spec = f"served=openai:micro@{srv.base_url}"
        kw = dict(limit=3, max_new_tokens=8, progress=False)
        res = evaluate_models([spec], ["dolly"], [10, 20], tmp_path / "a", **kw)
        evaluate_models([spec], ["dolly"], [10], tmp_path / "b", **kw)
    entry = res["models"]["served"]["benchmarks"]["dolly"]
    assert entry["n"] == 3 and entry["dropped"] == 0 and res["models"]["served"]["kind"] == "api"
    a10 = (tmp_path / "a/predictions/served/dolly/seed10.jsonl").read_text()
    a20 = (tmp_path / "a/predictions/served/dolly/seed20.jsonl").read_text()
    assert a10 == (tmp_path / "b/predictions/served/dolly/seed10.jsonl").read_text()  # the request seed is honoured
    assert a10 != a20
    rows = [json.loads(x) for x in a10.splitlines()]
    refs = {e.id: e.references for e in load_examples("dolly").examples[:3]}
    assert all(r["output"] and r["rougeL"] == pytest.approx(rouge_l(r["output"], refs[r["id"]])) for r in rows)
