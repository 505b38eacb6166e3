import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.cli import main
from lmdistill.data import (BENCHMARKS, Example, IGNORE_INDEX, TokenizedExample, collate_for_generation,
                            collate_for_training, filter_empty_outputs, format_prompt, load_examples, tokenize_examples)
from lmdistill.data.registry import count_rows
from lmdistill.errors import DataError


def write(path, text: bytes | str):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


BAD = (b'{"instruction": "a", "output": "b"}\n'
       b'{"instruction": "a"}\n'
       b'{not json\n'
       b'{"instruction": "x", "output": "   "}\n'
       b'\xff\xfe\n'
       b'{"instruction": 3, "output": "y"}\n'
       b'{"instruction": "q", "output": "r", "references": [1]}\n'
       b'{"instruction": "fine", "input": "ctx", "output": "ok"}\n')


def test_errors_name_file_line_and_field(tmp_path):
    f = write(tmp_path / "data.jsonl", BAD)
    with pytest.raises(DataError) as e:
        load_examples(f)
    msgs = [str(p) for p in e.value.problems]
    assert msgs == [
        f'{f}:2: field "output" is missing',
        f"{f}:3: is not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        f'{f}:4: field "output" is empty',
        f"{f}:5: is not valid UTF-8 (byte 0)",
        f'{f}:6: field "instruction" must be a string, got int',
        f'{f}:7: field "references" must be a list of strings',
    ]
    assert str(e.value).splitlines()[0] == msgs[0]


def test_skip_mode_reports_what_it_skipped(tmp_path):
    f = write(tmp_path / "data.jsonl", BAD)
    res = load_examples(f, skip_bad=True)
    assert [e.instruction for e in res.examples] == ["a", "fine"]
    assert sorted({p.line for p in res.skipped}) == [2, 3, 4, 5, 6, 7]
    assert "skipped 6 bad row(s) at line(s) 2, 3, 4, 5, 6, 7" in res.report()


def test_duplicate_ids_are_an_error(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"id":"a","instruction":"i","output":"o"}\n{"id":"a","instruction":"j","output":"p"}\n')
    with pytest.raises(DataError, match=r'd.jsonl:2: field "id" duplicates the id \'a\' of line 1'):
        load_examples(f)


def test_json_list_chat_messages_and_folders(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "a.json", json.dumps([{"instruction": "i1", "output": "o1"}]))
    write(folder / "b.jsonl", json.dumps({"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again?"},
        {"role": "assistant", "content": "yes"}]}) + "\n")
    res = load_examples(folder)
    assert [e.output for e in res.examples] == ["o1", "yes"]
    chat = res.examples[1]
    assert chat.instruction == "again?" and len(chat.messages) == 4
    prompt = format_prompt(chat, "alpaca")
    assert "### Instruction:\nagain?" in prompt and "User: hi\nAssistant: hello" in prompt


def test_bad_chat_roles(tmp_path):
    f = write(tmp_path / "c.jsonl", json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r'c.jsonl:1: field "messages\[0\].role" must be one of'):
        load_examples(f)


def test_unknown_source_is_a_clear_error():
    with pytest.raises(DataError, match="neither a file, a folder, a bundled benchmark"):
        load_examples("no/such/file.jsonl")


def test_registry_matches_files():
    for b in BENCHMARKS.values():
        for split in b.splits:
            path = b.path(split)
            assert (path.parent / "LICENSE").exists() and (path.parent / "SOURCE.md").exists()
            assert len(load_examples(f"{b.name}:{split}").examples) == count_rows(path)
    assert count_rows(BENCHMARKS["dolly"].path("test")) == 500
    assert count_rows(BENCHMARKS["selfinst"].path()) == 242
    assert count_rows(BENCHMARKS["vicuna"].path()) == 80
    assert count_rows(BENCHMARKS["sni"].path()) == 1694
    sni = load_examples("sni").examples
    assert max(len(e.references) for e in sni) > 1 and all(e.references[0] == e.output for e in sni)


def test_alpaca_template_matches_minillm_protocol():
    ex = Example(id="1", instruction="Name a color.", output="Blue")
    assert format_prompt(ex) == ("Below is an instruction that describes a task. Write a response that appropriately "
                                 "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n")
    ex2 = Example(id="2", instruction="Summarise.", input="Some text.", output="x")
    assert format_prompt(ex2).endswith("### Instruction:\nSummarise.\n\n### Input:\nSome text.\n\n### Response:\n")


def test_chat_template(tokenizer):
    ex = Example(id="1", instruction="Name a color.", input="Pick one.", output="Blue")
    assert format_prompt(ex, "chat", tokenizer) == "<|user|>\nName a color.\n\nPick one.<|end|>\n<|assistant|>\n"


def test_tokenize_filter_and_truncation(tokenizer):
    short = Example(id="s", instruction="Say hi.", output="hi " * 600)
    long = Example(id="l", instruction="word " * 400, output="x")
    toks, reports = tokenize_examples([short, long], tokenizer, max_prompt_length=256, max_length=512)
    assert [t.id for t in toks] == ["s"] and reports[0].removed_ids == ["l"] and reports[0].kept == 1
    t = toks[0]
    assert len(t.input_ids) == 512 and t.response_ids[-1] == tokenizer.eos_token_id
    assert t.loss_mask == [0] * len(t.prompt_ids) + [1] * len(t.response_ids)
    assert tokenizer.decode(t.prompt_ids) == format_prompt(short)
    # texts longer than model_max_length are cut by us (and reported), without the tokenizer's own warning
    fresh = copy.deepcopy(tokenizer)
    tokenize_examples([Example(id="x", instruction="Say hi.", output="hi " * (fresh.model_max_length + 10))], fresh)
    assert "sequence-length-is-longer-than-the-specified-maximum" not in fresh.deprecation_warnings


def test_empty_filter_reports():
    exs = [Example(id="a", instruction="i", output="o"), Example(id="b", instruction="i", output=" ")]
    kept, rep = filter_empty_outputs(exs)
    assert [e.id for e in kept] == ["a"] and rep.removed_ids == ["b"] and "removed 1" in str(rep)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 5)), min_size=1, max_size=5))
def test_collation_padding(lengths):
    batch = [TokenizedExample(str(i), list(range(10, 10 + p)), list(range(50, 50 + r)))
             for i, (p, r) in enumerate(lengths)]
    tr = collate_for_training(batch, pad_id=0)
    for i, x in enumerate(batch):
        n = len(x.input_ids)
        assert tr["input_ids"][i, :n].tolist() == x.input_ids            # right padding
        assert tr["attention_mask"][i].sum() == n
        assert tr["loss_mask"][i].tolist() == x.loss_mask + [0] * (tr["input_ids"].shape[1] - n)
        assert all((lab == IGNORE_INDEX) == (m == 0) for lab, m in zip(tr["labels"][i].tolist(), tr["loss_mask"][i].tolist()))
    gen = collate_for_generation([x.prompt_ids for x in batch], pad_id=0)
    for i, x in enumerate(batch):
        p = len(x.prompt_ids)
        assert gen["input_ids"][i, -p:].tolist() == x.prompt_ids          # left padding
        assert gen["attention_mask"][i].tolist() == [0] * (gen["input_ids"].shape[1] - p) + [1] * p


def test_cli_list_and_check(tmp_path, capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name, rows in [("dolly", "500"), ("dolly:train", "11885"), ("selfinst", "242"), ("vicuna", "80"),
                       ("sni", "1694"), ("unni", "1050")]:
        line = next(x for x in out.splitlines() if x.split()[0] == name)
        assert rows in line.split()
    f = write(tmp_path / "bad.jsonl", BAD)
    assert main(["data", "check", str(f)]) == 1
    out = capsys.readouterr().out
    assert f'{f}:2: field "output" is missing' in out and "6 problem(s) found" in out
    assert main(["data", "check", str(f), "--skip-bad"]) == 0
    assert "skipped 6 bad row(s)" in capsys.readouterr().out
    good = write(tmp_path / "good.jsonl", '{"instruction": "a", "output": "b"}\n')
    assert main(["data", "check", str(good)]) == 0
    assert "loaded 1 rows" in capsys.readouterr().out


def test_cli_show(capsys):
    assert main(["data", "show", "vicuna"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 80 and out["example"]["id"] == "vicuna-1"
    assert out["prompt_tokens"]["min"] <= out["prompt_tokens"]["p50"] <= out["prompt_tokens"]["max"]
