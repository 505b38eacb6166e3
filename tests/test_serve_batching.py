"""Continuous batching (issue 19): concurrent requests decode as one batch and each gets exactly what it gets
alone; the queue is bounded (429 with Retry-After); a closed stream leaves the batch; the local client batches.

Exactness is checked in float64 (the unbatched path and the batch then agree to ~1e-15, far below any gap
between two logits); in float32 a batched row may differ from the row alone by rounding (bench/README.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lmdistill.cli import main
from lmdistill.clients import make_client
from lmdistill.clients.chat import LocalChatClient
from lmdistill.decoding import BatchError, Batcher, ChatEngine, QueueFull
from lmdistill.decoding import batcher as batcher_module
from lmdistill.models import load_model_and_tokenizer
from lmdistill.serve import ServerThread, create_app

TEXTS = ["Who are you?", "Hi", "Tell me a long story about three cats and a dog.", "What is 2+2?", "x",
         "Why is the sky blue? Explain it to a child.", "List five fruits", "Bonjour, ça va ?"]


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@contextlib.contextmanager
def batched_picks(wrap):
    """Every batched request's token choice goes through ``wrap(pick)`` (the batcher's ``sampler.pick``)."""
    real = batcher_module.pick
    batcher_module.pick = wrap(real)
    try:
        yield
    finally:
        batcher_module.pick = real


def slow_picks(seconds: float, calls: list | None = None):
    """Each batched token choice takes ``seconds`` longer (a slow model), so requests overlap in time."""

    def wrap(real):
        def slow(*a):
            if calls is not None:
                calls.append(1)
            time.sleep(seconds)
            return real(*a)
        return slow

    return batched_picks(wrap)


@pytest.fixture(scope="module")
def f64(model_dirs):
    model, tok = load_model_and_tokenizer(model_dirs["student"])
    return model.double().eval(), tok


def settings(alone: ChatEngine) -> list[dict]:
    """One request per text, each with other settings: greedy, seeded sampling, nucleus, stop strings,
    max_tokens, logprobs, prompt logprobs; a stop string taken from inside the greedy answer, so it hits."""
    greedy = alone.complete(chat(TEXTS[0]), max_tokens=24).text
    return [
        {"max_tokens": 24, "stop": [greedy[5:9]]},
        {"max_tokens": 17, "temperature": 1.0, "seed": 3},
        {"max_tokens": 40, "temperature": 0.7, "top_p": 0.9, "seed": 5, "logprobs": 3},
        {"max_tokens": 3},
        {"max_tokens": 31, "temperature": 1.3, "seed": 11, "stop": ["e", "zz"]},
        {"max_tokens": 12, "logprobs": 0, "prompt_logprobs": 2},
        {"max_tokens": 1, "temperature": 1.0, "seed": 0},
        {"max_tokens": 26, "temperature": 0.9, "seed": 7, "logprobs": 5},
    ]


def run(engine: ChatEngine, text: str, kw: dict):
    kw = dict(kw)
    ids = engine.prompt_ids(chat(text), kw["max_tokens"])
    deltas = [d for d, done in engine.stream_ids(ids, **kw) if d]
    done = engine.complete_ids(ids, **kw)
    assert "".join(deltas) == done.text  # the stream's deltas add up to the answer
    return done


def same(a, b) -> None:
    assert (a.token_ids, a.text, a.finish_reason, a.completion_tokens) == \
        (b.token_ids, b.text, b.finish_reason, b.completion_tokens)
    for xs, ys in ((a.logprobs, b.logprobs), (a.prompt_logprobs, b.prompt_logprobs)):
        assert (xs is None) == (ys is None)
        for x, y in zip(xs or [], ys or []):
            assert (x is None) == (y is None)
            if x is not None:
                assert (x.token, x.rank, [t for t, _ in x.top]) == (y.token, y.rank, [t for t, _ in y.top])
                assert x.logprob == pytest.approx(y.logprob, abs=1e-6)


# ---- the engine: batched equals alone -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_concurrent_requests_get_what_they_get_alone(f64, backend):
    model, tok = f64
    alone = ChatEngine(model, tok)
    batched = ChatEngine(model, tok, max_batch_size=4)
    batched.batcher.backend = backend
    # a token that ends one greedy answer early: the stop-token path too
    stop_token = alone.complete(chat(TEXTS[3]), max_tokens=8).token_ids[2]
    alone.handle.stop_ids = batched.handle.stop_ids = alone.stop_ids | {stop_token}
    kws = settings(alone)
    want = [run(alone, t, kw) for t, kw in zip(TEXTS, kws)]
    with ThreadPoolExecutor(len(TEXTS)) as pool:  # 8 requests, 4 at a time: later ones join as others leave
        got = list(pool.map(lambda a: run(batched, *a), zip(TEXTS, kws)))
    for w, g in zip(want, got):
        same(w, g)
    assert {w.finish_reason for w in want} == {"stop", "length"}
    assert want[3].finish_reason == "stop" and want[0].finish_reason == "stop"
    assert batched.batcher.peak == 4 and batched.batcher.inflight == 0


def test_a_request_joins_while_others_run(f64):
    model, tok = f64
    alone, batched = ChatEngine(model, tok), ChatEngine(model, tok, max_batch_size=8)
    long_ids = alone.prompt_ids(chat(TEXTS[2]), 80)
    with slow_picks(0.005):
        first = batched.stream_ids(long_ids, max_tokens=80, temperature=1.0, seed=1)
        head = [next(first) for _ in range(3)]  # it is running
        steps_before = batched.batcher.steps
        joined = [batched.stream_ids(alone.prompt_ids(chat(t), 20), max_tokens=20) for t in TEXTS[3:6]]
        rest = [d for d in first]
        joined_text = ["".join(d for d, _ in s) for s in joined]
    assert batched.batcher.steps > steps_before and batched.batcher.peak >= 2
    assert "".join(d for d, _ in head + rest) == alone.complete_ids(long_ids, max_tokens=80, temperature=1.0,
                                                                    seed=1).text
    assert joined_text == [alone.complete(chat(t), max_tokens=20).text for t in TEXTS[3:6]]


def test_completions_of_many_prompts_run_as_one_batch(f64, prompts):
    model, tok = f64
    alone, batched = ChatEngine(model, tok), ChatEngine(model, tok, max_batch_size=8)
    kw = {"max_tokens": 6, "temperature": 0.8, "seed": 4, "logprobs": 2, "prompt_logprobs": 3}
    got = batched.complete_many_ids(prompts, **kw)
    for ids, g in zip(prompts, got):
        same(alone.complete_ids(ids, **kw), g)
    assert batched.batcher.peak == len(prompts)
    scored = batched.complete_many_ids(prompts, max_tokens=0, prompt_logprobs=2)  # scoring only
    for ids, g in zip(prompts, scored):
        same(alone.complete_ids(ids, max_tokens=0, prompt_logprobs=2), g)
        assert g.token_ids == [] and len(g.prompt_logprobs) == len(ids)


def test_a_model_with_hooks_falls_back_to_its_own_forward(f64):
    """A forward hook (offloading, instrumentation) keeps a request off the fast decoder, decided per request
    when it joins: the model's forward runs once per step, and the answer is the same."""
    model, tok = f64
    alone, batched = ChatEngine(model, tok), ChatEngine(model, tok, max_batch_size=4)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        ids = alone.prompt_ids(chat(TEXTS[0]), 5)
        got = batched.complete_ids(ids, max_tokens=5)
        assert len(calls) == got.completion_tokens + (got.finish_reason == "stop")  # one per token chosen
    finally:
        handle.remove()
    same(alone.complete_ids(ids, max_tokens=5), got)
    before = len(calls)
    batched.complete_ids(ids, max_tokens=5)
    assert len(calls) == before  # without the hook: the fast decoder


def test_closing_a_stream_frees_its_slot(f64):
    model, tok = f64
    engine = ChatEngine(model, tok, max_batch_size=1, max_queue=0)
    ids = engine.prompt_ids(chat(TEXTS[0]), 900)
    picks: list = []
    with slow_picks(0.01, picks):  # 900 tokens would take 9 s
        stream = engine.stream_ids(ids, max_tokens=900)
        next(stream)
        with pytest.raises(QueueFull) as err:  # one slot, no queue: full
            engine.stream_ids(ids, max_tokens=2)
        assert err.value.retry_after >= 1
        stream.close()
        wait_idle(engine)
        assert len(picks) < 300
        assert engine.complete_ids(ids, max_tokens=2).completion_tokens <= 2
        dropped = engine.stream_ids(ids, max_tokens=900)  # never read, then dropped: cancelled too
        time.sleep(0.05)
        del dropped
        before = len(picks)
        wait_idle(engine)
        assert len(picks) - before < 300


def wait_idle(engine: ChatEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.batcher.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.batcher.inflight == 0


def test_queue_limit_is_all_or_nothing_and_an_empty_batcher_takes_any_request(f64):
    model, tok = f64
    engine = ChatEngine(model, tok)
    engine.handle.stop_ids = set()  # every request runs its 3 tokens
    batcher = Batcher(engine.handle, max_batch=2, max_queue=1)
    gate = threading.Event()
    try:
        # the scheduler waits inside its first step
        with batched_picks(lambda real: lambda *a: (gate.wait(30), real(*a))[1]):
            req = {"ids": [1, 5, 9], "max_tokens": 3}
            big = batcher.submit([req] * 5)  # an empty batcher takes more than the limit (max_batch + max_queue = 3)
            assert batcher.inflight == 5 and batcher.full()
            with pytest.raises(QueueFull):
                batcher.submit([req])
            gate.set()
            for t in big:
                assert len(list(t)) == 3
            assert batcher.inflight == 0 and batcher.peak == 2
            gate.clear()
            two = batcher.submit([req, req])
            with pytest.raises(QueueFull):  # 2 + 2 > 3: neither is queued
                batcher.submit([req, req])
            assert batcher.inflight == 2
            one = batcher.submit([req])
            gate.set()
            assert [len(list(t)) for t in (*two, *one)] == [3, 3, 3]
    finally:
        gate.set()
        batcher.close()


def test_idle_scheduler_exits_and_restarts(f64):
    model, tok = f64
    engine = ChatEngine(model, tok, max_batch_size=2)
    engine.batcher.idle_timeout = 0.05
    ids = engine.prompt_ids(chat(TEXTS[1]), 4)
    a = engine.complete_ids(ids, max_tokens=4)
    deadline = time.monotonic() + 10
    while engine.batcher._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.batcher._thread is None and engine.batcher._slots is None  # no thread, no KV memory held
    assert engine.complete_ids(ids, max_tokens=4).token_ids == a.token_ids


# ---- the server -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(f64):
    model, tok = f64
    app = create_app(model, tok, model_name="micro", max_tokens_limit=1000, max_batch_size=4, max_queue=4)
    with ServerThread(app) as srv:
        srv.engine = app.state.engine
        srv.alone = ChatEngine(model, tok)
        yield srv


def post(srv, body, **kw):
    return httpx.post(f"{srv.base_url}/chat/completions", json=body, timeout=60, **kw)


def stream_chat(srv, body) -> tuple[str, list[float], list[dict]]:
    """(content, arrival time of each content chunk, chunks)."""
    times, chunks = [], []
    with httpx.stream("POST", f"{srv.base_url}/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                c = json.loads(line[6:])
                chunks.append(c)
                if c["choices"] and c["choices"][0]["delta"].get("content"):
                    times.append(time.monotonic())
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    return text, times, chunks


def test_concurrent_streams_interleave_and_match_their_plain_answers(served):
    bodies = [{"messages": chat(t), "max_tokens": 60, "temperature": 0.8, "seed": i, "logprobs": True,
               "top_logprobs": 2} for i, t in enumerate(TEXTS[:4])]
    plain = [post(served, b).json()["choices"][0] for b in bodies]  # one at a time
    peak = served.engine.batcher.peak
    with slow_picks(0.005), ThreadPoolExecutor(4) as pool:
        streamed = list(pool.map(lambda b: stream_chat(served, b), bodies))
    for p, (text, _, chunks) in zip(plain, streamed):
        assert text == p["message"]["content"]
        scores = [e for c in chunks if c["choices"] for e in (c["choices"][0]["logprobs"] or {}).get("content", [])]
        assert [e["token"] for e in scores] == [e["token"] for e in p["logprobs"]["content"]]
    for b, p in zip(bodies, plain):  # and what the unbatched engine answers
        assert p["message"]["content"] == served.alone.complete(b["messages"], max_tokens=60, temperature=0.8,
                                                                 seed=b["seed"]).text
    spans = [(t[0], t[-1]) for _, t, _ in streamed if t]
    assert len(spans) >= 3 and max(s for s, _ in spans) < min(e for _, e in spans)  # all open at once
    assert peak == 1 and served.engine.batcher.peak >= 2


def test_full_queue_gets_429_with_retry_after_and_health_stays_fast(f64):
    model, tok = f64
    app = create_app(model, tok, model_name="micro", max_tokens_limit=900, max_batch_size=1, max_queue=1)
    engine = app.state.engine
    gate, picked = threading.Event(), threading.Event()

    def held(real):
        def pick(*a):  # the scheduler stalls on its first token until the test lets it go
            picked.set()
            gate.wait(30)
            return real(*a)
        return pick

    body = {"messages": chat(TEXTS[0]), "max_tokens": 5}
    try:
        with batched_picks(held), ServerThread(app) as srv, ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, srv, body)  # runs (held)
            assert picked.wait(30)
            second = pool.submit(post, srv, body)  # waits in the queue
            deadline = time.monotonic() + 30
            while engine.batcher.inflight < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            for path, refused in (("/chat/completions", body), ("/completions", {"prompt": "Hello", "max_tokens": 2})):
                r = httpx.post(srv.base_url + path, json=refused, timeout=30)
                assert r.status_code == 429, r.text
                assert int(r.headers["retry-after"]) >= 1
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["code"] == "rate_limit_exceeded"
            with httpx.stream("POST", f"{srv.base_url}/chat/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 429 and "retry-after" in r.headers  # refused before the stream starts
            t0 = time.monotonic()
            assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
            assert time.monotonic() - t0 < 1.0
            gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
            assert post(srv, body).status_code == 200  # room again
    finally:
        gate.set()


def test_a_client_that_hangs_up_frees_its_slot(f64):
    model, tok = f64
    app = create_app(model, tok, model_name="micro", max_tokens_limit=900, max_batch_size=1, max_queue=0)
    engine = app.state.engine
    picks: list = []
    body = {"messages": chat(TEXTS[0]), "max_tokens": 900, "stream": True}
    with slow_picks(0.01, picks), ServerThread(app) as srv:  # 900 tokens would take 9 s
        with httpx.stream("POST", f"{srv.base_url}/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            assert post(srv, {"messages": chat("Hi"), "max_tokens": 2}).status_code == 429
        wait_idle(engine)
        assert len(picks) < 400
        assert post(srv, {"messages": chat("Hi"), "max_tokens": 2}).status_code == 200


def test_batching_off_is_the_unbatched_engine(f64):
    model, tok = f64
    app = create_app(model, tok, model_name="micro", max_batch_size=0)
    assert app.state.engine.batcher is None
    body = {"messages": chat(TEXTS[0]), "max_tokens": 8, "temperature": 0.9, "seed": 2}
    with ServerThread(app) as srv, ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda _: post(srv, body).json()["choices"][0]["message"]["content"], range(3)))
    assert set(texts) == {ChatEngine(model, tok).complete(body["messages"], max_tokens=8, temperature=0.9,
                                                          seed=2).text}


def test_serve_cli_rejects_bad_batch_options(model_dirs, capsys):
    assert main(["serve", model_dirs["student"], "--max-batch-size", "-1"]) == 2
    assert "--max-batch-size" in capsys.readouterr().err
    assert main(["serve", model_dirs["student"], "--max-queue", "-1"]) == 2
    assert "--max-queue" in capsys.readouterr().err


# ---- the local client -------------------------------------------------------------------------------------------

def test_local_client_chat_many_runs_as_one_batch(model_dirs, tmp_path):
    batched = LocalChatClient(model_dirs["student"], dtype=torch.float64, max_batch_size=4)
    alone = LocalChatClient(model_dirs["student"], dtype=torch.float64, max_batch_size=0)
    assert batched.concurrency == 4 and alone.concurrency == 1 and alone.engine.batcher is None
    batch = [chat(t) for t in TEXTS]
    params = {"max_tokens": 12, "temperature": 0.7, "seed": 3}
    got = batched.chat_many(batch, **params)
    assert got == alone.chat_many(batch, **params)
    assert batched.engine.batcher.peak == 4
    cached = make_client(model_dirs["student"], dtype=torch.float64, cache_path=tmp_path / "c.jsonl")
    assert cached.concurrency == 16  # the batch size reaches the caching wrapper's chat_many
    assert cached.chat_many(batch, **params) == got and cached.misses == len(batch)
    assert cached.chat_many(batch, **params) == got and cached.hits == len(batch)
    for c in (batched, alone, cached):
        c.close()


def test_shared_prefixes_are_copied_not_recomputed_and_answers_stay_the_same(f64):
    """A system prompt shared by many requests, and a follow-up turn that extends an earlier conversation: their
    columns are copied from rows that hold them (live or left over), and every answer is still the alone one."""
    model, tok = f64
    alone, batched = ChatEngine(model, tok), ChatEngine(model, tok, max_batch_size=4)
    batched.batcher.idle_timeout = 600  # the rows' leftovers must outlive the unbatched reference runs
    system = {"role": "system", "content": "You are a careful assistant who answers every question in full. " * 3}
    convs = [[system, {"role": "user", "content": t}] for t in TEXTS[:6]]
    kw = {"max_tokens": 10, "temperature": 0.8, "seed": 9}
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda m: batched.complete(m, **kw), convs))
    assert [g.token_ids for g in got] == [alone.complete(m, **kw).token_ids for m in convs]
    slots = batched.batcher._slots
    shared = len(os.path.commonprefix([alone.prompt_ids(convs[0], 10), alone.prompt_ids(convs[1], 10)]))
    assert shared > 20 and slots.reused >= 5 * shared  # every prompt after the first
    last = batched.complete(convs[-1], **kw)  # on its own: its row keeps its tokens when it ends
    follow = convs[-1] + [{"role": "assistant", "content": last.text}, {"role": "user", "content": "And then?"}]
    before = slots.reused
    assert batched.complete(follow, **kw).token_ids == alone.complete(follow, **kw).token_ids
    first_turn = len(alone.prompt_ids(convs[-1], 10))
    assert slots.reused - before >= first_turn  # the whole first turn, not only the system prompt
    scored = batched.complete_ids(alone.prompt_ids(convs[2], 3), max_tokens=3, prompt_logprobs=1)  # full prefill
    same(alone.complete_ids(alone.prompt_ids(convs[2], 3), max_tokens=3, prompt_logprobs=1), scored)


def test_a_failing_request_ends_alone_and_the_batch_goes_on(f64):
    model, tok = f64
    alone, batched = ChatEngine(model, tok), ChatEngine(model, tok, max_batch_size=4)

    def failing(real):
        def pick(logits, temperature, top_p, gen):
            if temperature == 0.5:
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
            return real(logits, temperature, top_p, gen)
        return pick

    ids = [alone.prompt_ids(chat(t), 12) for t in TEXTS[:3]]
    temps = [0.0, 0.5, 0.9]

    def one(i):
        try:
            return batched.complete_ids(ids[i], max_tokens=12, temperature=temps[i], seed=i)
        except BatchError as e:
            return e

    with batched_picks(failing), ThreadPoolExecutor(3) as pool:
        got = list(pool.map(one, range(3)))
    assert isinstance(got[1], BatchError) and isinstance(got[1].__cause__, RuntimeError)
    for i in (0, 2):
        same(alone.complete_ids(ids[i], max_tokens=12, temperature=temps[i], seed=i), got[i])
    assert batched.batcher.inflight == 0
