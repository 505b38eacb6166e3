"""``lmdistill score``: ROUGE-L of existing predictions, matched by id, and its errors."""

from __future__ import annotations

import json

import pytest
from rouge_score import rouge_scorer

from lmdistill.cli import main
from lmdistill.data import load_examples

DIRECT = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def direct(pred: str, refs: list[str]) -> float:
    return 100 * max(DIRECT.score(r, pred)["rougeL"].fmeasure for r in refs)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def run_score(capsys, *args) -> tuple[int, dict | None, str]:
    rc = main(["score", *args])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


def make_prediction(i: int, ex) -> str:
    """Varied, partly right predictions: a reference cut short, the instruction, or a later reference."""
    if i % 3 == 0:
        return " ".join(ex.references[0].split()[:4])
    if i % 3 == 1:
        return ex.instruction[:80]
    return ex.references[-1] + " and more"


def test_score_equals_rouge_score_on_sni_with_multiple_references(tmp_path, capsys):
    exs = load_examples("sni").examples
    assert sum(len(e.references) > 1 for e in exs) > 100
    preds = {e.id: make_prediction(i, e) for i, e in enumerate(exs)}
    pfile = write_rows(tmp_path / "p.jsonl", [{"id": i, "output": o} for i, o in preds.items()])
    expected = sum(direct(preds[e.id], e.references) for e in exs) / len(exs)

    rc, got, err = run_score(capsys, "--predictions", pfile, "--references", "sni")
    assert rc == 0, err
    assert got["n"] == len(exs) == 1694
    assert got["rougeL"] == pytest.approx(expected, abs=1e-9)

    # the same through a references file holding the lists, rows in another order
    rows = [{"id": e.id, "references": e.references} for e in reversed(exs)]
    rfile = write_rows(tmp_path / "r.jsonl", rows)
    rc, got2, err = run_score(capsys, "--predictions", pfile, "--references", rfile)
    assert rc == 0, err
    assert got2["rougeL"] == pytest.approx(expected, abs=1e-9) and got2["n"] == len(exs)


def test_references_file_with_output_only_and_integer_ids(tmp_path, capsys):
    pfile = write_rows(tmp_path / "p.jsonl", [{"id": 1, "output": "  the cat sat  "}, {"id": 2, "output": "dogs bark"}])
    rfile = write_rows(tmp_path / "r.jsonl", [{"id": "1", "output": "a cat sat down"},
                                              {"id": 2, "output": "the dog barks", "references": ["dogs bark loudly"]}])
    rc, got, err = run_score(capsys, "--predictions", pfile, "--references", rfile,
                             "--per-example", str(tmp_path / "each.jsonl"))
    assert rc == 0, err
    first = direct("the cat sat", ["a cat sat down"])
    second = direct("dogs bark", ["the dog barks", "dogs bark loudly"])
    assert got == {"rougeL": pytest.approx((first + second) / 2), "n": 2, "missing": 0}
    each = [json.loads(x) for x in (tmp_path / "each.jsonl").read_text().splitlines()]
    assert [e["id"] for e in each] == ["1", "2"] and each[1]["rougeL"] == pytest.approx(second)


def test_bundled_dolly_name(tmp_path, capsys):
    exs = load_examples("dolly").examples
    pfile = write_rows(tmp_path / "p.jsonl", [{"id": e.id, "output": e.instruction} for e in exs])
    rc, got, err = run_score(capsys, "--predictions", pfile, "--references", "dolly")
    assert rc == 0, err
    assert got["n"] == 500
    assert got["rougeL"] == pytest.approx(sum(direct(e.instruction, e.references) for e in exs) / 500)


def test_mismatched_ids_are_listed(tmp_path, capsys):
    exs = load_examples("vicuna").examples
    rows = [{"id": e.id, "output": "x"} for e in exs[15:]] + [{"id": f"ghost-{i}", "output": "y"} for i in range(3)]
    pfile = write_rows(tmp_path / "p.jsonl", rows)
    rc, _, err = run_score(capsys, "--predictions", pfile, "--references", "vicuna")
    assert rc == 2
    assert "3 id(s) in" in err and "ghost-0, ghost-1, ghost-2" in err
    assert "15 reference id(s) have no prediction" in err
    missing = [e.id for e in exs[:15]]
    assert ", ".join(missing[:10]) in err and "(5 more)" in err and missing[10] not in err
    assert "--allow-missing" in err


def test_allow_missing_scores_the_predicted_subset(tmp_path, capsys):
    exs = load_examples("vicuna").examples
    pfile = write_rows(tmp_path / "p.jsonl", [{"id": e.id, "output": e.instruction} for e in exs[:7]])
    rc, _, err = run_score(capsys, "--predictions", pfile, "--references", "vicuna")
    assert rc == 2 and "73 reference id(s) have no prediction" in err
    rc, got, err = run_score(capsys, "--predictions", pfile, "--references", "vicuna", "--allow-missing")
    assert rc == 0, err
    assert got["n"] == 7 and got["missing"] == 73
    assert got["rougeL"] == pytest.approx(sum(direct(e.instruction, e.references) for e in exs[:7]) / 7)
    # ids with no reference stay an error even then
    extra = write_rows(tmp_path / "q.jsonl", [{"id": "nope", "output": "z"}])
    rc, _, err = run_score(capsys, "--predictions", extra, "--references", "vicuna", "--allow-missing")
    assert rc == 2 and "nope" in err


def test_bad_rows_name_file_line_and_field(tmp_path, capsys):
    pfile = tmp_path / "p.jsonl"
    pfile.write_text('{"id": "a", "output": "x"}\n{"id": "b"}\nnot json\n{"output": "y"}\n{"id": "a", "output": "z"}\n'
                     '{"id": "c", "output": 3}\n', encoding="utf-8")
    rc, _, err = run_score(capsys, "--predictions", str(pfile), "--references", "dolly")
    assert rc == 2
    for needle in (f'{pfile}:2: field "output" is missing', f"{pfile}:3: is not valid JSON",
                   f'{pfile}:4: field "id" is missing', f'{pfile}:5: field "id" duplicates the id \'a\' of line 1',
                   f'{pfile}:6: field "output" must be a string'):
        assert needle in err, err
    rfile = write_rows(tmp_path / "r.jsonl", [{"id": "a"}, {"id": "b", "references": "not a list"}])
    rc, _, err = run_score(capsys, "--predictions", write_rows(tmp_path / "ok.jsonl", [{"id": "a", "output": "x"}]),
                           "--references", rfile)
    assert rc == 2
    assert f'{rfile}:1: field "references" is missing' in err
    assert f'{rfile}:2: field "references" must be a list of strings' in err
    rc, _, err = run_score(capsys, "--predictions", str(tmp_path / "absent.jsonl"), "--references", "dolly")
    assert rc == 2 and "absent.jsonl: does not exist" in err
