"""RSE (served micro models + a scripted judge that sometimes answers malformed), judge-free similarity,
white-box degree, and the combined report."""

from __future__ import annotations

import json

import pytest

from lmdistill.cli import main
from lmdistill.clients import make_client
from lmdistill.errors import ConfigError
from lmdistill.models import load_model_and_tokenizer
from lmdistill.quantify.judges import LLMJudge
from lmdistill.quantify.rse import load_prompt_set, run_rse
from lmdistill.quantify.similarity import blocks, similarity
from lmdistill.serve import ServerThread, create_app
from lmdistill.serve.testing import scripted_app
from test_quantify_support import start_scripted


@pytest.fixture(scope="module")
def servers(model_dirs):
    started = {}
    for role in ("teacher", "student"):
        model, tok = load_model_and_tokenizer(model_dirs[role])
        started[role] = ServerThread(create_app(model, tok, model_name=role, max_tokens_limit=64)).start()
    started["judge"], started["judge_app"] = start_scripted()
    yield started
    for role in ("teacher", "student", "judge"):
        started[role].stop()


def spec(srv, name):
    return f"openai:{name}@{srv.base_url}"


def test_rse_cli_with_judge_and_embeddings(servers, model_dirs, tmp_path):
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": f"Explain topic {i}.", "input": ""}) for i in range(4)))
    out = tmp_path / "rse"
    args = ["quantify", "rse", "--target", spec(servers["student"], "student"), "--reference",
            spec(servers["teacher"], "teacher"), "--judge", spec(servers["judge"], "judge"), "--prompts", "arena-hard",
            str(prompts), "--limit", "3", "--max-tokens", "12", "--embedding-model", model_dirs["teacher"],
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "rse.json").read_text())
    assert summary["pairs"] == 6 and summary["config"]["sets"] == {"arena-hard": 3, "mine": 3}
    js = summary["judge_scores"]
    assert set(js["per_set"]) == {"arena-hard", "mine"} and js["unparsable"] == 0
    items = [json.loads(l) for l in (out / "rse_items.jsonl").read_text().splitlines()]
    assert any(r["judge_requests"] == 2 for r in items)  # a malformed reply was re-asked
    for s in ("arena-hard", "mine"):
        mine = [r["judge"]["overall"] for r in items if r["set"] == s]
        assert js["per_set"][s]["overall"] == pytest.approx(sum(mine) / len(mine), abs=1e-4)
    assert js["mean_of_sets"]["style"] == pytest.approx(
        (js["per_set"]["arena-hard"]["style"] + js["per_set"]["mine"]["style"]) / 2, abs=1e-4)
    sim = summary["similarity"]["mean_of_sets"]
    assert all(0 <= sim[a] <= 1 for a in ("style", "structure", "content", "overall")) and -1 <= sim["embedding"] <= 1
    md = (out / "rse.md").read_text()
    assert (out / "rse.png").read_bytes()[:4] == b"\x89PNG" and "ours (judge-free)" in md
    assert summary["similarity_label"] == "ours (judge-free)" and "Logical structure" in md
    assert js["errors"] == [] and all(r["judge_error"] is None for r in items)
    assert all(js["per_set"][s]["n"] == 3 for s in ("arena-hard", "mine"))
    calls = len(servers["judge_app"].state.calls)
    assert main(args) == 0 and len(servers["judge_app"].state.calls) == calls  # the rerun is all cache hits


def test_rse_without_judge_and_unparsable_judge(servers, tmp_path):
    sets = dict([load_prompt_set("arena-hard", 2)])
    t = make_client(spec(servers["student"], "student"))
    same = run_rse(t, t, sets, max_tokens=8, progress=False)
    assert same["judge_scores"] is None
    assert same["similarity"]["mean_of_sets"]["overall"] == 1.0  # a model compared with itself
    with ServerThread(scripted_app(lambda m, b: "no scores at all")) as bad:
        judge = make_client(spec(bad, "bad"), base_delay=0.001)
        r = run_rse(t, make_client(spec(servers["teacher"], "teacher")), sets, judge=judge, max_tokens=8,
                    max_reasks=1, progress=False)
        assert r["judge_scores"]["unparsable"] == 2 and r["judge_scores"]["mean_of_sets"]["overall"] is None
        assert len(bad.server.config.app.state.calls) == 4  # 2 pairs x (1 ask + 1 re-ask)
        # every pair is kept with a clear, recorded error; none is dropped silently
        assert len(r["items"]) == 2 and all(it["judge"] is None for it in r["items"])
        for it in r["items"]:
            assert it["judge_error"].startswith("malformed judge reply after 2 request(s): no score for style, "
                                                "structure, content, overall")
            assert "no scores at all" in it["judge_error"]
        assert [e["id"] for e in r["judge_scores"]["errors"]] == [it["id"] for it in r["items"]]
        assert r["judge_scores"]["per_set"]["arena-hard"]["n"] == 0
        re_asks = [c["messages"][-1]["content"] for c in bad.server.config.app.state.calls if len(c["messages"]) > 2]
        assert len(re_asks) == 2 and all("no score for style" in m for m in re_asks)  # says what was missing


def test_prompt_set_loading_errors(tmp_path):
    name, items = load_prompt_set("arena-hard")
    assert name == "arena-hard" and len(items) == 500
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        load_prompt_set(str(bad))
    with pytest.raises(ConfigError):
        load_prompt_set(str(tmp_path / "missing.jsonl"))
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert [i["prompt"] for i in load_prompt_set(str(txt))[1]] == ["one", "two"]


def test_similarity_features():
    a = "# Plan\n\nFirst we **load** data.\n\n- step one\n- step two\n\n```python\nx = 1\n```\n"
    assert similarity(a, a) == {"style": 1.0, "structure": 1.0, "content": 1.0, "overall": 1.0}
    assert blocks(a) == ["heading", "paragraph", "bullet", "bullet", "code"]
    b = "We load data in one go, then stop."
    near = "# Plan\n\nFirst we **load** the data.\n\n- step one\n- step 2\n\n```python\nx = 2\n```\n"
    assert similarity(a, near)["overall"] > similarity(a, b)["overall"]
    assert similarity(a, b)["structure"] < 0.5


def test_whitebox_cli(model_dirs, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Say {i}", "output": f"Answer number {i}."}) for i in range(3)))
    out = tmp_path / "wb"
    assert main(["quantify", "whitebox", "--teacher", model_dirs["teacher"], "--student", model_dirs["teacher"],
                 "--prompts", str(prompts), "--max-new-tokens", "6", "--out", str(out / "self"), "--no-progress"]) == 0
    same = json.loads((out / "self" / "whitebox.json").read_text())
    assert same["kl_mean"] == pytest.approx(0, abs=1e-5) and same["top1_agreement"] == 1.0
    assert main(["quantify", "whitebox", "--teacher", model_dirs["teacher"], "--student", model_dirs["padded_student"],
                 "--prompts", str(prompts), "--use-references", "--out", str(out / "pair"), "--no-progress"]) == 0
    pair = json.loads((out / "pair" / "whitebox.json").read_text())
    assert pair["kl_mean"] > 0.001 and pair["tokens"] > 3 and pair["responses"] == "references"


def test_combined_report_with_scatter(tmp_path):
    def fake(d, name, loose, overall):
        d.mkdir()
        (d / "ice.json").write_text(json.dumps({
            "target": name, "judge": "rule", "helper": "h",
            "config": {"fact": "f", "mutants": 1, "questions": 50, "seed": 0},
            "scores": {"loose": loose, "strict": loose / 2, "hard": 0.0, "queries": 50, "errors": 0, "unparsable": 0},
            "per_language": {}}))
        sim = {a: overall for a in ("style", "structure", "content", "overall")}
        (d / "rse.json").write_text(json.dumps({"target": name, "reference": "ref", "judge": None,
                                                "similarity": {"per_set": {"s": sim}, "mean_of_sets": sim},
                                                "judge_scores": None}))

    fake(tmp_path / "a", "model-a", 0.3, 0.6)
    fake(tmp_path / "b", "model-b", 0.1, 0.4)
    assert main(["quantify", "report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")]) == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["charts"] == ["ice.png", "rse.png", "ice_vs_rse.png"] and len(rep["scatter"]) == 2
    md = (tmp_path / "r" / "report.md").read_text()
    assert "model-a" in md and "0.30" in md
    assert main(["quantify", "report", str(tmp_path / "r"), "--out", str(tmp_path / "x")]) == 2


def test_agreement_cli(tmp_path, capsys):
    assert main(["quantify", "agreement", "--out", str(tmp_path / "a.json")]) == 0
    result = json.loads((tmp_path / "a.json").read_text())
    assert result["overall"]["loose"]["n"] >= 60 and "disagreements" in result
    assert '"accuracy"' in capsys.readouterr().out


def test_judges_that_reject_requests_do_not_crash(servers):
    with ServerThread(scripted_app(lambda m, b: "", fault=lambda n, b: (400, "too long"))) as bad:
        judge = make_client(spec(bad, "bad"))
        t = make_client(spec(servers["student"], "student"))
        r = run_rse(t, t, dict([load_prompt_set("arena-hard", 1)]), judge=judge, max_tokens=4, progress=False)
        assert r["judge_scores"]["unparsable"] == 1
        assert r["items"][0]["judge_error"].startswith("judge rejected the request:") and "too long" in \
            r["items"][0]["judge_error"]
        v = LLMJudge(judge).judge("I am ChatGPT", "I am Qwen")
        assert v.unparsable and not v.loose


def test_whitebox_kl_equals_a_float64_brute_force(model_dirs):
    """compare_on's KL(teacher || student) through the losses' shared divergence equals a float64 sum."""
    import torch

    from lmdistill.models import load_model
    from lmdistill.quantify.whitebox import compare_on

    teacher, student = load_model(model_dirs["teacher"]), load_model(model_dirs["padded_student"])
    ids, n_prompt = list(range(5, 30)), 9
    got = compare_on(teacher, student, ids, n_prompt)
    with torch.no_grad():
        x = torch.tensor([ids])
        v = teacher.config.vocab_size
        t = torch.log_softmax(teacher(input_ids=x).logits[0, n_prompt - 1:-1, :v].double(), -1)
        s = torch.log_softmax(student(input_ids=x).logits[0, n_prompt - 1:-1, :v].double(), -1)
        kl = (t.exp() * (t - s)).sum(-1)
    assert got["tokens"] == len(ids) - n_prompt
    assert got["kl_sum"] == pytest.approx(float(kl.sum()), rel=1e-5)


@pytest.mark.parametrize("reply,problem", [
    ("", "empty reply"),
    ("response style: 4\nlogical structure: 3", "no score for content, overall"),
    ("response style: 4\nlogical structure: 7\ncontent detail: 5\noverall: 0", "out of range 1-5: structure=7, overall=0"),
    ('{"style": 9, "structure": 2, "content": 1}', "no score for style, structure, content, overall"),
])
def test_rse_parse_names_the_problem(reply, problem):
    from lmdistill.quantify.rse import parse_scores_detail

    assert parse_scores_detail(reply) == (None, problem)


def test_rse_parse_reads_the_paper_aspect_names():
    from lmdistill.quantify.rse import parse_scores_detail

    reply = "Alike.\n**Response style:** 4\nLogical structure: 3.5\ncontent detail = 5\nOverall: 4/5"
    assert parse_scores_detail(reply) == ({"style": 4.0, "structure": 3.5, "content": 5.0, "overall": 4.0}, None)
