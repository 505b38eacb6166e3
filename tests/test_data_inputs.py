"""Data as users have it (issue 30, item 4), each case a real file written here: a UTF-8 byte-order mark is accepted;
UTF-16 and UTF-32 (either byte order, with or without a mark) are named once with the iconv command that converts
them; a JSON array saved as .jsonl is named as such; the response-length cut reports its rows and the share of
response tokens lost, and `data show` labels lengths after the cut; a missing field next to a look-alike gets a
did-you-mean."""

from __future__ import annotations

import codecs
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lmdistill.cli import main
from lmdistill.data import Example, format_prompt, load_examples, tokenize_examples
from lmdistill.data.tokenize import CutReport
from lmdistill.errors import DataError

ROWS = [{"id": "a", "instruction": "Name a colour.", "output": "Bleu, comme le ciel d'été."},
        {"id": "b", "instruction": "Translate 'cat'.", "input": "日本語", "output": "猫 (neko)"},
        {"id": "c", "instruction": "Say hi.", "output": "hi"}]
TEXT = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)


def fields(examples) -> list[tuple]:
    return [(e.id, e.instruction, e.input, e.output) for e in examples]


WANT = [(r["id"], r["instruction"], r.get("input", ""), r["output"]) for r in ROWS]


def problems_of(path: Path, **kw) -> list[str]:
    with pytest.raises(DataError) as e:
        load_examples(path, **kw)
    return [str(p) for p in e.value.problems]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, suffix, capsys):
    body = TEXT if suffix == ".jsonl" else json.dumps(ROWS, ensure_ascii=False, indent=1)
    path = tmp_path / f"excel{suffix}"
    path.write_bytes(codecs.BOM_UTF8 + body.encode("utf-8"))
    assert fields(load_examples(path).examples) == WANT
    assert main(["data", "check", str(path)]) == 0
    assert "loaded 3 rows" in capsys.readouterr().out
    path.write_bytes(codecs.BOM_UTF8)   # a mark alone is an empty file
    assert problems_of(path) == [f"{path}: the file is empty"]


WIDE = [("utf-16-le", codecs.BOM_UTF16_LE, "UTF-16 (LE, with a byte-order mark)", "UTF-16"),
        ("utf-16-le", b"", "UTF-16 (LE)", "UTF-16LE"),
        ("utf-16-be", codecs.BOM_UTF16_BE, "UTF-16 (BE, with a byte-order mark)", "UTF-16"),
        ("utf-16-be", b"", "UTF-16 (BE)", "UTF-16BE"),
        ("utf-32-le", codecs.BOM_UTF32_LE, "UTF-32 (LE, with a byte-order mark)", "UTF-32"),
        ("utf-32-le", b"", "UTF-32 (LE)", "UTF-32LE"),
        ("utf-32-be", codecs.BOM_UTF32_BE, "UTF-32 (BE, with a byte-order mark)", "UTF-32"),
        ("utf-32-be", b"", "UTF-32 (BE)", "UTF-32BE")]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("codec,bom,named,iconv_name", WIDE, ids=[f"{w[0]}{'-bom' if w[1] else ''}" for w in WIDE])
def test_utf16_and_utf32_are_named_once_with_the_conversion(tmp_path, suffix, codec, bom, named, iconv_name, capsys):
    body = TEXT if suffix == ".jsonl" else json.dumps(ROWS, ensure_ascii=False)
    path = tmp_path / f"notepad{suffix}"
    path.write_bytes(bom + body.encode(codec))
    target = tmp_path / f"notepad.utf8{suffix}"
    want = (f"{path}: the file is {named}, not UTF-8; convert it to UTF-8, e.g. iconv -f {iconv_name} -t UTF-8 "
            f"{path} > {target}")
    assert problems_of(path) == [want]
    assert problems_of(path, skip_bad=True) == [want]   # a whole-file problem is not a row to skip
    assert main(["data", "check", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [want, "1 problem(s) found; fix them or rerun with --skip-bad"]
    if shutil.which("iconv"):   # the command given converts the file into one that loads
        subprocess.run(want.split("e.g. ", 1)[1], shell=True, check=True)
        assert fields(load_examples(target).examples) == WANT


@pytest.mark.parametrize("layout", ["pretty", "one-line", "broken"])
def test_a_json_array_in_a_jsonl_file_is_named_as_such(tmp_path, layout, capsys):
    text = {"pretty": json.dumps(ROWS, ensure_ascii=False, indent=2),
            "one-line": json.dumps(ROWS, ensure_ascii=False),
            "broken": json.dumps(ROWS, ensure_ascii=False, indent=2)[:-10]}[layout]
    path = tmp_path / "export.jsonl"
    path.write_text(text, encoding="utf-8")
    [problem] = problems_of(path)
    assert problem == (f"{path}: holds a JSON array, not JSON Lines (one object per line); rename it to export.json "
                       f"(a .json file is read as a list of rows), or write one row per line, e.g. jq -c '.[]' "
                       f"{path} > {tmp_path / 'export.rows.jsonl'}")
    assert main(["data", "check", str(path)]) == 1
    assert len(capsys.readouterr().out.splitlines()) == 2
    renamed = path.rename(tmp_path / "export.json")   # the first fix given
    if layout == "broken":
        with pytest.raises(DataError, match=rf"^{renamed}:\d+: is not valid JSON"):
            load_examples(renamed)
    else:
        assert fields(load_examples(renamed).examples) == WANT


def test_arrays_on_many_lines_are_rows_not_a_json_array(tmp_path):
    path = tmp_path / "lists.jsonl"
    path.write_text("[1, 2]\n[3]\n")
    assert problems_of(path) == [f"{path}:1: row must be a JSON object, got list",
                                 f"{path}:2: row must be a JSON object, got list"]


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_the_response_cut_reports_rows_and_the_share_of_tokens_lost(tokenizer, tmp_path, capsys):
    """Four rows with one prompt and responses of L1 < L2 < L3 < L4 tokens, max_length = P + 1 + L2: the rows of
    L3 and L4 are cut, losing (L3 - L2) + (L4 - L2) of L1 + L2 + L3 + L4 tokens; the row of L2 fits exactly; a fifth
    row's prompt is over max_prompt_length (dropped, its response not counted)."""
    outputs = ["one two", "one two three four five six", "one two three four five six seven eight nine ten",
               " ".join(["word"] * 40)]
    rows = [{"id": f"r{i}", "instruction": "Count.", "output": o} for i, o in enumerate(outputs)]
    rows.append({"id": "long", "instruction": "many words " * 60, "output": "short"})
    path = tmp_path / "cut.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lens = [n_tokens(tokenizer, o) for o in outputs]
    assert lens == sorted(lens) and len(set(lens)) == 4
    prompt = n_tokens(tokenizer, format_prompt(Example(id="x", instruction="Count.")))
    max_length, max_prompt = prompt + 1 + lens[1], prompt + 5
    toks, reports = tokenize_examples(load_examples(path).examples, tokenizer, max_prompt_length=max_prompt,
                                      max_length=max_length)
    assert [t.id for t in toks] == ["r0", "r1", "r2", "r3"] and reports[0].removed_ids == ["long"]
    cut = reports[1]
    lost, total = (lens[2] - lens[1]) + (lens[3] - lens[1]), sum(lens)
    assert isinstance(cut, CutReport) and cut.cut_ids == ["r2", "r3"] and cut.removed == 0
    assert (cut.tokens_lost, cut.tokens_total, cut.share_lost) == (lost, total, lost / total)
    assert str(cut) == (f"response-length cut: kept 4, cut 2 (response cut so prompt + response + EOS fit max_length "
                        f"{max_length} tokens; {lost} of {total} response tokens lost, {100 * lost / total:.2f}%)")
    assert [len(t.response_ids) for t in toks] == [lens[0] + 1, lens[1] + 1, lens[1] + 1, lens[1] + 1]

    assert main(["data", "show", str(path), "--max-length", str(max_length), "--max-prompt-length",
                 str(max_prompt)]) == 0
    shown = json.loads(capsys.readouterr().out)
    as_written = lens + [n_tokens(tokenizer, "short")]   # the data's own lengths, the dropped row's included
    assert (shown["response_tokens"]["min"], shown["response_tokens"]["max"]) == (min(as_written), lens[3])
    assert shown[f"prompts_over_{max_prompt}_tokens (dropped by the MiniLLM filter)"] == 1
    assert shown[f"responses_cut_at_max_length_{max_length}"] == {
        "rows": 2, "response_tokens_lost": lost, "of_response_tokens": total, "share_lost": round(lost / total, 6)}
    [after] = [k for k in shown if k.startswith("after_length_rules")]
    assert shown[after]["rows"] == 4 and shown[after]["response_tokens"]["max"] == lens[1] + 1   # cut, EOS added
    assert shown["filters"] == [str(r) for r in reports]


def test_a_missing_field_next_to_a_look_alike_gets_a_did_you_mean(tmp_path, capsys):
    path = tmp_path / "typos.jsonl"
    rows = [{"instruction": "a", "ouput": "b"},
            {"Instrution": "a", "output": "b"},
            {"instruction": "a", "response": "b", "category": "open_qa"},
            {"messages": [{"role": "user", "contnet": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"instruction": "a", "output": "b", "ouput": "c"},   # nothing missing: the extra field is ignored
            {"instruction": "a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert problems_of(path) == [
        f'{path}:1: field "output" is missing; did you mean "ouput"?',
        f'{path}:2: field "instruction" is missing; did you mean "Instrution"?',
        f'{path}:3: field "output" is missing (the row has "response", "category"; the fields read are instruction, '
        f'input, output, references, messages, id, source, teacher)',
        f'{path}:4: field "messages[0].content" is missing; did you mean "contnet"?',
        f'{path}:6: field "output" is missing']
    assert main(["data", "check", str(path)]) == 1
    assert f'{path}:1: field "output" is missing; did you mean "ouput"?' in capsys.readouterr().out
