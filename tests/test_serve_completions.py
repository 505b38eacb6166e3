"""``POST /v1/completions`` on a micro model over real HTTP, and the client's prompt log-probabilities."""

from __future__ import annotations

import httpx
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from lmdistill.cli import main
from lmdistill.clients import ClientError, OpenAIChatClient, RetriesExhausted, RetryPolicy
from lmdistill.models import load_model_and_tokenizer
from lmdistill.decoding import ChatEngine
from lmdistill.serve import ServerThread, create_app

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "Who are you?"}]
MAX_BATCH = 6


@pytest.fixture(scope="module")
def served(model_dirs):
    model, tok = load_model_and_tokenizer(model_dirs["teacher"])
    model.eval()
    app = create_app(model, tok, model_name="micro", api_key=KEY, max_tokens_limit=64, max_logprobs=20,
                     max_batch_prompts=MAX_BATCH)
    with ServerThread(app) as srv:
        srv.model, srv.tok, srv.engine = model, tok, ChatEngine(model, tok)
        yield srv


def post(srv, body, headers=AUTH):
    return httpx.post(f"{srv.base_url}/completions", json=body, headers=headers, timeout=60)


def ok(srv, body) -> dict:
    r = post(srv, body)
    assert r.status_code == 200, r.text
    return r.json()


def reference(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's own forward over ``ids``: row t scores the token at t + 1."""
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def client(srv, **kw) -> OpenAIChatClient:
    return OpenAIChatClient("micro", srv.base_url, api_key=KEY, **kw)


@pytest.mark.parametrize("api", ["echo", "prompt_logprobs"])
def test_prompt_logprobs_equal_the_models_log_softmax(served, prompts, api):
    c = client(served)
    for ids in prompts:
        got = c.prompt_logprobs(ids, 5, api=api)
        ref = reference(served.model, ids)
        assert len(got) == len(ids) and got[0] is None
        for t in range(1, len(ids)):
            vals, idx = ref[t - 1].topk(5)
            assert list(got[t]) == idx.tolist()  # the top 5, most likely first, keyed by token id
            assert torch.allclose(torch.tensor(list(got[t].values())), vals, atol=1e-5)
    assert c.attempts == len(prompts)
    c.close()


def test_actual_token_is_listed_with_its_logprob_and_rank(served, prompts):
    ids = prompts[0]
    ref = reference(served.model, ids)
    body = {"model": "micro", "prompt": ids, "echo": True, "logprobs": 2, "prompt_logprobs": 3, "max_tokens": 0,
            "return_tokens_as_token_ids": True}
    choice = ok(served, body)["choices"][0]
    lp, plp = choice["logprobs"], choice["prompt_logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in ids] and choice["finish_reason"] == "length"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and plp[0] is None
    assert len(plp) == len(lp["top_logprobs"]) == len(ids)
    for t in range(1, len(ids)):
        actual = ref[t - 1, ids[t]].item()
        rank = int((ref[t - 1] > ref[t - 1, ids[t]]).sum()) + 1
        top = lp["top_logprobs"][t]
        assert abs(lp["token_logprobs"][t] - actual) < 1e-5 and abs(top[f"token_id:{ids[t]}"] - actual) < 1e-5
        assert len(top) == (2 if rank <= 2 else 3)  # the top 2 plus the actual token, as vLLM sends
        entry = plp[t][str(ids[t])]
        assert entry["rank"] == rank and abs(entry["logprob"] - actual) < 1e-5
        assert entry["decoded_token"] == served.tok.decode([ids[t]])
        best = ref[t - 1].topk(3).indices.tolist()
        assert [plp[t][str(i)]["rank"] for i in best] == [1, 2, 3]
        assert len(plp[t]) == (3 if rank <= 3 else 4)


def test_logprobs_zero_lists_only_the_actual_token_and_plain_token_strings(served, prompts):
    ids = prompts[1]
    lp = ok(served, {"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0})["choices"][0]["logprobs"]
    pieces = [served.tok.decode([t]) for t in ids]
    assert lp["tokens"] == pieces
    assert all(list(top) == [pieces[t]] for t, top in enumerate(lp["top_logprobs"]) if t > 0)
    assert lp["text_offset"] == [sum(len(p) for p in pieces[:t]) for t in range(len(ids))]


def test_batches_of_prompts(served, prompts):
    rows = [prompts[i % len(prompts)] for i in range(7)]
    c = client(served)
    single = [c.prompt_logprobs(ids, 4) for ids in rows]
    c.attempts = 0
    many = c.prompt_logprobs_many(rows, 4, batch_size=3)
    assert c.attempts == 3  # 3 + 3 + 1 rows
    for a, b in zip(single, many):
        assert a[0] is None and b[0] is None
        for x, y in zip(a[1:], b[1:]):
            assert list(x) == list(y) and all(abs(x[k] - y[k]) < 1e-5 for k in x)
    vllm = c.prompt_logprobs_many(rows, 4, api="prompt_logprobs", batch_size=MAX_BATCH)
    assert [[None if d is None else list(d) for d in row] for row in vllm] == \
        [[None if d is None else list(d) for d in row] for row in single]
    out = ok(served, {"prompt": ["Hello there", prompts[2], "Hi"], "max_tokens": 2, "temperature": 0})
    assert [ch["index"] for ch in out["choices"]] == [0, 1, 2]
    n_text = sum(len(served.tok(t)["input_ids"]) for t in ("Hello there", "Hi"))
    assert out["usage"]["prompt_tokens"] == n_text + len(prompts[2])
    r = post(served, {"prompt": [prompts[0]] * (MAX_BATCH + 1), "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_echo_text_and_generation_match_chat_greedy(served):
    ids = served.engine.prompt_ids(MSG, 12)
    chat = httpx.post(f"{served.base_url}/chat/completions", headers=AUTH, timeout=60,
                      json={"messages": MSG, "max_tokens": 12, "temperature": 0}).json()["choices"][0]
    plain = ok(served, {"prompt": ids, "max_tokens": 12, "temperature": 0})["choices"][0]
    assert plain["text"] == chat["message"]["content"] == served.engine.complete(MSG, max_tokens=12).text
    assert plain["finish_reason"] == chat["finish_reason"] and plain["logprobs"] is None
    echoed = ok(served, {"prompt": ids, "max_tokens": 12, "temperature": 0, "echo": True})["choices"][0]["text"]
    assert echoed == served.tok.decode(ids) + plain["text"]
    text = "The capital of France is"
    out = ok(served, {"prompt": text, "max_tokens": 0, "echo": True})
    assert out["choices"][0]["text"] == text and out["usage"]["completion_tokens"] == 0
    more = ok(served, {"prompt": text, "max_tokens": 3, "echo": True, "temperature": 0})["choices"][0]["text"]
    assert more.startswith(text) and len(more) > len(text)


def test_generated_token_logprobs_are_raw_log_softmax(served, prompts):
    ids = prompts[0]
    body = {"prompt": ids, "max_tokens": 5, "temperature": 0.7, "seed": 3, "logprobs": 3,
            "return_tokens_as_token_ids": True}
    a, b = ok(served, body)["choices"][0], ok(served, body)["choices"][0]
    # a seed reproduces the sample; the scores only to rounding: the second request reuses the first's cached prompt
    # columns (prefix reuse), computed in another batch shape than a fresh prefill (seen: 1e-6 apart on an AMD EPYC)
    assert a["text"] == b["text"] and a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
    for x, y in zip(a["logprobs"]["top_logprobs"], b["logprobs"]["top_logprobs"]):
        assert list(x) == list(y) and all(abs(x[k] - y[k]) < 1e-5 for k in x)
    assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-5)
    lp = a["logprobs"]
    gen = [int(t.split(":")[1]) for t in lp["tokens"]]
    assert len(gen) == ok(served, body)["usage"]["completion_tokens"]
    ref = reference(served.model, ids + gen)
    for j, t in enumerate(gen):
        row = ref[len(ids) - 1 + j]  # temperature not applied to the scores
        assert abs(lp["token_logprobs"][j] - row[t].item()) < 1e-5
        assert set(row.topk(3).indices.tolist()) <= {int(k.split(":")[1]) for k in lp["top_logprobs"][j]}
    # echo + logprobs + generation: the prompt's scores first, then the generated ones
    both = ok(served, {**body, "echo": True})["choices"][0]["logprobs"]
    assert both["tokens"] == [f"token_id:{t}" for t in ids] + lp["tokens"]
    assert both["token_logprobs"][len(ids):] == lp["token_logprobs"]


def test_scoring_is_one_forward_pass(served, prompts):
    calls = []
    handle = served.model.register_forward_hook(lambda m, args, kwargs, out: calls.append(1), with_kwargs=True)
    try:
        ok(served, {"prompt": prompts[0], "echo": True, "logprobs": 5, "max_tokens": 0})
        assert len(calls) == 1
        ok(served, {"prompt": prompts[0], "echo": True, "logprobs": 5, "prompt_logprobs": 5, "max_tokens": 1})
        assert len(calls) == 2  # the first decoding step scores the prompt too
    finally:
        handle.remove()


@pytest.mark.parametrize("extra,param", [
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": 1.5}, "logprobs"),
    ({"logprobs": "3"}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": False}, "prompt_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 65}, "max_tokens"),
    ({"max_tokens": -1, "echo": True}, "max_tokens"),
    ({"echo": "yes"}, "echo"),
    ({"return_tokens_as_token_ids": 1}, "return_tokens_as_token_ids"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"best_of": 2}, "best_of"),
    ({"suffix": "end"}, "suffix"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"top_k": 5}, "top_k"),
    ({"stream": True}, "stream"),
    ({"n": 2}, "n"),
    ({"temperature": 3}, "temperature"),
    ({"stop": [1]}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": [99999]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": {"text": "hi"}}, "prompt"),
    ({"prompt": [5] * 1100}, "prompt"),
])
def test_bad_requests_get_400_naming_the_parameter(served, extra, param):
    r = post(served, {"model": "micro", "prompt": "Hello", **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param


def test_neutral_values_context_limit_auth_and_model(served):
    neutral = {"best_of": 1, "suffix": None, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0,
               "user": "u", "stream": False, "n": 1}
    assert ok(served, {"prompt": "Hello", "max_tokens": 2, **neutral})["object"] == "text_completion"
    r = post(served, {"prompt": [5] * 1024, "echo": True, "max_tokens": 1})  # 1024 + 1 > the 1024 positions
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert len(ok(served, {"prompt": [5] * 1024, "echo": True, "max_tokens": 0})["choices"][0]["text"]) > 0
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = post(served, {"prompt": "Hello"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = post(served, {"model": "gpt-4", "prompt": "Hello"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.post(f"{served.base_url}/completions", content=b"{", headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400
    with pytest.raises(ClientError, match="401|authentication"):
        OpenAIChatClient("micro", served.base_url, api_key="wrong").prompt_logprobs([1, 2, 3], 2)


def test_openai_package_reads_the_answer(served, prompts):
    import openai

    c = openai.OpenAI(api_key=KEY, base_url=served.base_url, max_retries=0)
    resp = c.completions.create(model="micro", prompt=prompts[1], max_tokens=4, temperature=0, logprobs=2, echo=True)
    ch = resp.choices[0]
    assert ch.logprobs.top_logprobs[0] is None
    assert len(ch.logprobs.tokens) == len(prompts[1]) + resp.usage.completion_tokens
    assert ch.text.startswith(served.tok.decode(prompts[1]))
    c.close()


def fake_server(choice_for, fault=None):
    """A completions server answering ``choice_for(prompt_ids)`` per prompt; ``fault(n)`` may return a status."""
    app = FastAPI()
    app.state.n = 0

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        n, app.state.n = app.state.n, app.state.n + 1
        if fault and fault(n):
            return JSONResponse({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}},
                                status_code=fault(n))
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        return {"id": "x", "object": "text_completion", "created": 0, "model": "m",
                "choices": [{"index": i, "text": "", "finish_reason": "length", **choice_for(p)}
                            for i, p in enumerate(prompts)]}

    return app


def echo_choice(tokens):
    return {"logprobs": {"tokens": tokens, "token_logprobs": [None] + [-1.0] * (len(tokens) - 1),
                         "top_logprobs": [None] + [{t: -1.0} for t in tokens[1:]], "text_offset": [0] * len(tokens)}}


def test_client_refuses_servers_that_ignore_ids_or_retokenize_and_retries():
    ignoring = fake_server(lambda p: echo_choice([f"w{t}" for t in p]))
    retokenizing = fake_server(lambda p: echo_choice([f"token_id:{t + 1}" for t in p]))
    short = fake_server(lambda p: {"prompt_logprobs": [None]})
    flaky = fake_server(lambda p: echo_choice([f"token_id:{t}" for t in p] + ["token_id:0"]),
                        fault=lambda n: 503 if n < 2 else None)
    with ServerThread(ignoring) as srv:
        with pytest.raises(ClientError, match="ignored return_tokens_as_token_ids"):
            OpenAIChatClient("m", srv.base_url, api_key="k").prompt_logprobs([1, 2, 3], 2)
    with ServerThread(retokenizing) as srv:
        with pytest.raises(ClientError, match="re-tokenized the prompt"):
            OpenAIChatClient("m", srv.base_url, api_key="k").prompt_logprobs([1, 2, 3], 2)
    with ServerThread(short) as srv:
        with pytest.raises(ClientError, match="re-tokenized the prompt"):
            OpenAIChatClient("m", srv.base_url, api_key="k").prompt_logprobs([1, 2, 3], 2, api="prompt_logprobs")
    with ServerThread(flaky) as srv:
        c = OpenAIChatClient("m", srv.base_url, api_key="k", retry=RetryPolicy(base_delay=0.001, max_delay=0.01))
        assert c.prompt_logprobs([1, 2, 3], 2) == [None, {2: -1.0}, {3: -1.0}] and c.attempts == 3
        c = OpenAIChatClient("m", srv.base_url, api_key="k", retry=RetryPolicy(max_retries=0))
        srv.server.config.app.state.n = 0
        with pytest.raises(RetriesExhausted):
            c.prompt_logprobs([1, 2, 3], 2)
    with pytest.raises(ClientError, match="top_k"):
        OpenAIChatClient("m", "http://127.0.0.1:9", api_key="k").prompt_logprobs([1], 0)
    with pytest.raises(ClientError, match="api"):
        OpenAIChatClient("m", "http://127.0.0.1:9", api_key="k").prompt_logprobs([1], 2, api="dense")


def test_serve_cli_rejects_negative_max_logprobs(model_dirs, capsys):
    assert main(["serve", model_dirs["student"], "--max-logprobs", "-1"]) == 2
    assert "--max-logprobs" in capsys.readouterr().err
