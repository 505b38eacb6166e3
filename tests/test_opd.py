"""On-policy distillation on sampled tokens (`opd`, losses/opd.py): its expected gradient is the reverse-KL gradient
(Monte Carlo), its advantage is Tinker's, a local and a served teacher give the same loss, the server is asked for
no top-k, a cache is refused, and `train opd` runs against `lmdistill serve`."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os

import httpx
import pytest
import torch
from safetensors.torch import load_file

from lmdistill.data import collate_for_training, load_examples, tokenize_examples
from lmdistill.errors import ConfigError
from lmdistill.generation.config import SamplingConfig
from lmdistill.losses.opd import OPDTerm, opd_advantages, opd_loss
from lmdistill.losses.term import TermInputs
from lmdistill.models import load_model
from lmdistill.teachers import open_teacher
from lmdistill.teachers.base import Need
from lmdistill.teachers.cache import TeacherCache
from lmdistill.teachers.capture import CaptureSettings, capture
from lmdistill.teachers.local import LocalTeacher
from lmdistill.teachers.served import ServedTeacher
from lmdistill.train import load_config, train

F64 = torch.float64


# ------------------------------------------------------------------ the estimator's expectation (Monte Carlo)
def _mc_gradient(z: torch.Tensor, logp: torch.Tensor, n: int, temperature: float, seed: int):
    """The gradient of opd's loss w.r.t. shared logits ``z`` over ``n`` single-step samples drawn at
    ``temperature``, with the standard error of each component (from the per-sample gradients)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.multinomial(torch.softmax(z / temperature, -1), n, replacement=True, generator=gen)
    zz = z.detach().clone().requires_grad_(True)
    loss = opd_loss(zz.expand(n, -1), x, logp[x], torch.ones(n, 1, dtype=torch.bool), temperature=temperature)
    loss.backward()
    with torch.no_grad():   # per-sample gradient: (q/b)(log q - log p)(onehot - q), the loss's own summand
        q, b = torch.log_softmax(z, -1), torch.log_softmax(z / temperature, -1)
        w = torch.exp(q[x] - b[x]) * (q[x] - logp[x])
        per = w[:, None] * (torch.nn.functional.one_hot(x, z.numel()).to(F64) - q.exp())
    return zz.grad, per.std(0) / n ** 0.5


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_expected_gradient_is_the_full_vocabulary_reverse_kl_gradient(temperature):
    """E_{x~q}[A(x) grad log q(x)] = -grad KL(q || p), single step, undiscounted: 400,000 samples of a 6-way
    categorical in float64 agree with the exact gradient within 5 standard errors per logit (at most 0.006 here) and
    0.02 absolute. At temperature 0.7 the samples come from softmax(z / 0.7) and the importance ratio corrects."""
    z = torch.tensor([0.3, -1.2, 2.0, 0.0, -0.4, 1.1], dtype=F64)
    logp = torch.log_softmax(torch.tensor([1.0, 0.5, -0.3, 2.2, -1.0, 0.0], dtype=F64), -1)
    zz = z.clone().requires_grad_(True)
    logq = torch.log_softmax(zz, -1)
    (logq.exp() * (logq - logp)).sum().backward()   # KL(q || p) over the whole vocabulary
    exact = zz.grad
    got, se = _mc_gradient(z, logp, 400_000, temperature, seed=0)
    assert exact.abs().max() > 0.1                    # a gradient worth matching
    assert bool(((got - exact).abs() <= 5 * se).all()), (got, exact, se)
    assert float((got - exact).abs().max()) < 0.02


def test_discount_one_gives_the_sequence_level_kl_gradient():
    """With ``discount: 1`` the advantage is the whole future's reverse KL, so over two-token sequences y of a
    tabular student q(y1) q(y2 | y1) the expected gradient is grad KL(q(y) || p(y)) (9 sequences enumerated exactly);
    200,000 sampled sequences, within 5 standard errors per parameter and 0.02 absolute."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, dtype=F64, generator=gen), torch.randn(3, 3, dtype=F64, generator=gen)
    pa = torch.log_softmax(torch.randn(3, dtype=F64, generator=gen), -1)
    pb = torch.log_softmax(torch.randn(3, 3, dtype=F64, generator=gen), -1)
    aa, bb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    la, lb = torch.log_softmax(aa, -1), torch.log_softmax(bb, -1)
    logq_y = la[:, None] + lb                      # [y1, y2]
    logp_y = pa[:, None] + pb
    (logq_y.exp() * (logq_y - logp_y)).sum().backward()
    exact = torch.cat([aa.grad, bb.grad.flatten()])

    n = 200_000
    y1 = torch.multinomial(torch.softmax(a, -1), n, replacement=True, generator=gen)
    y2 = torch.multinomial(torch.softmax(b[y1], -1), 1, generator=gen)[:, 0]
    aa, bb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    logits = torch.stack([aa.expand(n, -1), bb[y1]], 1).reshape(2 * n, 3)   # row-major: (row, position)
    targets = torch.stack([y1, y2], 1).reshape(-1)
    teacher = torch.stack([pa[y1], pb[y1, y2]], 1).reshape(-1)
    loss = opd_loss(logits, targets, teacher, torch.ones(n, 2, dtype=torch.bool), discount=1.0)
    (loss * 2).backward()     # the loss averages over the 2n tokens; the sequence KL is per sequence
    got = torch.cat([aa.grad, bb.grad.flatten()])
    with torch.no_grad():     # per-sequence gradient for the standard error
        r = (torch.log_softmax(a, -1)[y1] - pa[y1]) + (torch.log_softmax(b, -1)[y1, y2] - pb[y1, y2])
        r2 = torch.log_softmax(b, -1)[y1, y2] - pb[y1, y2]
        ga = r[:, None] * (torch.nn.functional.one_hot(y1, 3).to(F64) - torch.softmax(a, -1))
        gb = torch.zeros(n, 3, 3, dtype=F64)
        gb[torch.arange(n), y1] = r2[:, None] * (torch.nn.functional.one_hot(y2, 3).to(F64) - torch.softmax(b, -1)[y1])
        se = torch.cat([ga, gb.reshape(n, 9)], 1).std(0) / n ** 0.5
    assert bool(((got - exact).abs() <= 5 * se + 1e-12).all()), (got, exact, se)
    assert float((got - exact).abs().max()) < 0.02


# ------------------------------------------------------------------ Tinker's advantage, on a fixed input
def _tinker_advantages(sampled: list[float], teacher_full: list[float | None], mask: list[float], gamma: float):
    """tinker-cookbook 9dfcc3a, tinker_cookbook/distillation/train_on_policy.py:91-105 with kl_penalty_coef 1: the
    reverse KL (sampled - teacher[1:]) * mask, the advantage its negative times the mask, then (gamma > 0) the
    discounted sum of current and future values, tinker_cookbook/rl/metrics.py:192-211 (restated, not copied)."""
    rkl = [(s - t) * m for s, t, m in zip(sampled, teacher_full[1:], mask)]
    adv = [-m * r for m, r in zip(mask, rkl)]
    if gamma > 0:
        out, running = [0.0] * len(adv), 0.0
        for t in reversed(range(len(adv))):
            running = adv[t] + gamma * running
            out[t] = running
        adv = out
    return adv


@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
def test_advantages_equal_tinkers_formula(gamma):
    # two datums as Tinker lays them out: targets after the first token, a prompt (mask 0) then the sampled answer
    sampled = [[-0.5, -1.0, -0.2, -2.3, -0.7], [-3.0, -0.1, -1.7, -0.4, 0.0]]
    teacher = [[None, -0.9, -1.4, -0.6, -1.0, -2.5], [None, -2.0, -0.3, -0.8, -3.1, -1.1]]
    mask = [[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]]
    want = torch.tensor([_tinker_advantages(s, t, [float(m) for m in k], gamma)
                         for s, t, k in zip(sampled, teacher, mask)], dtype=F64)
    got = opd_advantages(torch.tensor(sampled, dtype=F64), torch.tensor([t[1:] for t in teacher], dtype=F64),
                         torch.tensor(mask), gamma)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert got.abs().sum() > 1   # a non-trivial input


def test_the_loss_gradient_is_minus_the_advantage_times_grad_log_q():
    """d L / d z_t = -(A_t / N)(onehot(x_t) - q_t) at every trained position (discount 0.9, two rows)."""
    gen = torch.Generator().manual_seed(3)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    n = int(mask.sum())
    z = torch.randn(n, 7, dtype=F64, generator=gen, requires_grad=True)
    x = torch.randint(0, 7, (n,), generator=gen)
    logp = torch.log_softmax(torch.randn(n, 7, dtype=F64, generator=gen), -1).gather(-1, x[:, None])[:, 0]
    opd_loss(z, x, logp, mask, discount=0.9).backward()
    logq = torch.log_softmax(z.detach(), -1)
    full_q, full_p = torch.zeros(2, 4, dtype=F64), torch.zeros(2, 4, dtype=F64)
    full_q[mask], full_p[mask] = logq.gather(-1, x[:, None])[:, 0], logp
    adv = opd_advantages(full_q, full_p, mask, 0.9)[mask]
    want = -(adv / n)[:, None] * (torch.nn.functional.one_hot(x, 7).to(F64) - logq.exp())
    assert torch.allclose(z.grad, want, atol=1e-12)


def test_clip_changes_nothing_on_policy_and_is_ppos_off_policy():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(6, 5, dtype=F64, generator=gen)
    x = torch.randint(0, 5, (6,), generator=gen)
    logp = torch.full((6,), -1.0, dtype=F64)
    mask = torch.ones(1, 6, dtype=torch.bool)

    def grad(**kw):
        zz = z.clone().requires_grad_(True)
        opd_loss(zz, x, logp, mask, **kw).backward()
        return zz.grad

    assert torch.equal(grad(clip=0.2), grad())
    # off-policy (sampled at T = 0.5): PPO's max(-A rho, -A clip(rho)) per token
    zz = z.clone().requires_grad_(True)
    got = opd_loss(zz, x, logp, mask, clip=0.2, temperature=0.5)
    lq = torch.log_softmax(z, -1).gather(-1, x[:, None])[:, 0]
    rho = torch.exp(lq - torch.log_softmax(z / 0.5, -1).gather(-1, x[:, None])[:, 0])
    adv = -(lq - logp)
    want = torch.maximum(-adv * rho, -adv * rho.clamp(0.8, 1.2)).mean()
    assert rho.sub(1).abs().max() > 0.2 and torch.allclose(got, want, atol=1e-12)


# ------------------------------------------------------------------ local vs served teacher
@pytest.fixture(scope="module")
def batch_rows(tokenizer):
    rows, _ = tokenize_examples(load_examples("dolly:train").examples[:4], tokenizer, max_prompt_length=80,
                                max_length=96)
    return rows, collate_for_training(rows, tokenizer.pad_token_id)


def spec(server) -> str:
    return f"openai:teacher@{server.base_url}"


def _inputs(student, teacher, batch, rows, whole=False):
    return TermInputs(student, teacher, batch, batch, same=True, whole=whole, rows=rows,
                      sampling=SamplingConfig(max_new_tokens=8))


@pytest.mark.parametrize("api", ["echo", "prompt_logprobs"])
def test_a_local_and_a_served_teacher_give_the_same_loss(teacher_server, model_dirs, batch_rows, api):
    rows, batch = batch_rows
    student = load_model(model_dirs["student"])
    local = LocalTeacher(load_model(model_dirs["teacher"]))
    served = ServedTeacher.from_spec(spec(teacher_server), top_k=1, api=api)
    n = int(batch["loss_mask"][:, 1:].sum())
    by_logits = _inputs(student, local, batch, rows).teacher_token_logprobs
    asked = local.token_logprobs(rows, batch)
    from_server = served.token_logprobs(rows, batch)
    assert by_logits.shape == asked.shape == from_server.shape == (n,)
    assert torch.allclose(by_logits, asked, atol=1e-6)
    assert torch.allclose(from_server, asked, atol=1e-5)
    term = OPDTerm(discount=0.5)
    losses = [term(_inputs(student, t, batch, rows, whole)) for t, whole in ((local, False), (local, True),
                                                                               (served, False))]
    assert abs(float(losses[0])) > 1e-3
    served.close()
    assert torch.allclose(losses[0], losses[1], atol=1e-6) and torch.allclose(losses[0], losses[2], atol=1e-5)


def _recording(monkeypatch) -> list[tuple[dict, bytes]]:
    """Every (request JSON, response body) the process's HTTP clients exchange, recorded at their transport (the
    openai package's: ``httpx``, or ``httpx2`` in its 3.x releases)."""
    seen = []
    for module in [httpx] + [importlib.import_module(m) for m in ("httpx2",) if importlib.util.find_spec(m)]:
        original = module.HTTPTransport.handle_request

        def handle(self, request, original=original):
            response = original(self, request)
            seen.append((json.loads(request.content or b"{}"), response.read()))
            return response

        monkeypatch.setattr(module.HTTPTransport, "handle_request", handle)
    return seen


def test_the_served_request_carries_no_top_k(teacher_server, batch_rows, monkeypatch):
    rows, batch = batch_rows
    seen = _recording(monkeypatch)
    echo_teacher = ServedTeacher.from_spec(spec(teacher_server), top_k=20, api="echo")
    vllm_teacher = ServedTeacher.from_spec(spec(teacher_server), top_k=20, api="prompt_logprobs")
    echo_teacher.token_logprobs(rows, batch)
    vllm_teacher.token_logprobs(rows, batch)
    (echo, echo_body), (vllm, vllm_body) = seen
    assert echo["echo"] is True and echo["logprobs"] == 0 and "prompt_logprobs" not in echo
    assert vllm["prompt_logprobs"] == 0 and "logprobs" not in vllm and not vllm.get("echo")
    for choice in json.loads(echo_body)["choices"]:      # the server lists each token's own score only
        assert all(t is None or len(t) == 1 for t in choice["logprobs"]["top_logprobs"])
    for choice in json.loads(vllm_body)["choices"]:
        assert all(e is None or len(e) == 1 for e in choice["prompt_logprobs"])
    echo_teacher.top_k(rows, batch)
    echo_teacher.close()
    vllm_teacher.close()
    assert seen[-1][0]["logprobs"] == 20 and len(seen[-1][1]) > 5 * len(echo_body)   # what top-k 20 would cost


# ------------------------------------------------------------------ a cache teacher: refused
def test_a_cache_teacher_is_refused(model_dirs, tmp_path):
    """A cache holds the top-k of rows captured in advance: never the student's new samples, and a sampled token
    outside the top-k has no log-probability there (only the tail's mass): opd refuses it, before anything loads
    and when it opens."""
    folder = tmp_path / "cache"
    capture(CaptureSettings(teacher=model_dirs["teacher"], data="dolly:train", out=str(folder), top_k=8, limit=2,
                            max_prompt_length=80, max_length=96, progress=False, template="alpaca"))
    with pytest.raises(ConfigError, match="term opd needs its log-probability of each token of given sequences or its "
                                          "full next-token distribution at every position; a cache teacher gives"):
        load_config("opd", [f"student={model_dirs['student']}", f"teacher=cache:{folder}"])
    need = Need("term opd", *OPDTerm.teacher_needs({}), new_sequences=True)
    with pytest.raises(ConfigError, match="term opd needs its log-probability of each token"):
        open_teacher(f"cache:{folder}", [need])
    with pytest.raises(ConfigError, match="a cache teacher cannot give its log-probability of each token"):
        TeacherCache(folder).token_logprobs([], {})


def test_the_config_refuses_what_opd_cannot_train_on(model_dirs):
    base = [f"student={model_dirs['student']}", f"teacher={model_dirs['teacher']}"]
    for extra, msg in ((["policy=mixed"], "must be the student's own samples .*got policy 'mixed'"),
                       (["policy=gold"], "got policy 'gold'"),
                       (["sampling.top_p=0.9"], "not for sampling.top_p=0.9"),
                       (["sampling.top_k=5"], "not for sampling.top_k=5"),
                       (["sampling.temperature=0"], "not for greedy decoding"),
                       (["objective.opd.discount=1.5"], "discount must be in"),
                       (["objective.opd.clip=0"], "clip must be in"),
                       (["chunked_loss=true"], "term\\(s\\) opd have no chunked form")):
        with pytest.raises(ConfigError, match=msg):
            load_config("opd", base + extra)
    assert load_config("opd", base + ["sampling.temperature=0.7", "objective.opd.clip=0.2"]).objective[0]["clip"] == 0.2


# ------------------------------------------------------------------ train opd end to end
def _opd(model_dirs, teacher, out, *extra):
    return load_config("opd", [f"student={model_dirs['student']}", f"teacher={teacher}", f"output_dir={out}",
                               "max_train_examples=8", "batch_size=4", "micro_batch_size=2", "valid_data=",
                               "save_steps=2", "eval_steps=1000", "progress=false", "max_length=96",
                               "max_prompt_length=80", "device=cpu", "max_steps=3", "sampling.max_new_tokens=8",
                               *extra])


def test_train_opd_against_a_served_teacher_equals_the_local_teacher(teacher_server, model_dirs, tmp_path):
    local = train(_opd(model_dirs, model_dirs["teacher"], tmp_path / "local", "objective.opd.discount=0.9"))
    served = train(_opd(model_dirs, spec(teacher_server), tmp_path / "served", "objective.opd.discount=0.9"))
    a = load_file(os.path.join(local["final"], "model.safetensors"))
    b = load_file(os.path.join(served["final"], "model.safetensors"))
    start = load_file(os.path.join(model_dirs["student"], "model.safetensors"))
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3      # it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    logged = [json.loads(x) for x in (tmp_path / "served" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r][-1] == 3
    scores = [json.loads(x) for x in (tmp_path / "served" / "teacher_scores.jsonl").read_text().splitlines()]
    assert scores and all(len(r["tlp"]) == len(r["pos"]) and "ids" not in r for r in scores)
