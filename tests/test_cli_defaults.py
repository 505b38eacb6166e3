"""Defaults a person would choose (issue 30, item 5): every ``--help`` states each default, ``--limit`` means the
same on every command, ``eval`` states its cost before it starts, ``--print-config`` needs no models, ``demo --out
DIR`` writes ``DIR/report.md``, ``template: auto`` picks the chat template when the tokenizers have one and says so,
and JSON reaches the terminal with its characters as they are."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from lmdistill.cli import COMMANDS, build_parser, limit_value, main
from lmdistill.cli import demo_cmd
from lmdistill.data import load_examples, tokenize_examples
from lmdistill.data.templates import resolve_template
from lmdistill.errors import ConfigError
from lmdistill.models import load_tokenizer
from lmdistill.train import load_config
from lmdistill.train.setup import load_rows, load_tokenizers, resolve_config_template

SKIPPED = (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)


def _walk(parser, path):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


@pytest.fixture(scope="module")
def parsers() -> dict[tuple, argparse.ArgumentParser]:
    """Every parser of ``lmdistill``: each subcommand's, and each action's of ``data``, ``models``, ``quantify``."""
    found = {}
    for name in COMMANDS:
        (sub,) = [a for a in build_parser([name])._actions if isinstance(a, argparse._SubParsersAction)]
        found.update(_walk(sub.choices[name], (name,)))
    return found


def _flat(text: str) -> str:
    """Help text with argparse's line wrapping undone (wrapped at spaces, and after hyphens)."""
    return re.sub(r"-\s+", "-", re.sub(r"\s+", " ", text))


def test_every_option_has_help_and_shows_its_default(parsers):
    assert {("eval",), ("train",), ("demo",), ("data", "show"), ("models", "prune"), ("quantify", "whitebox"),
            ("quantify", "ice"), ("serve",), ("capture",), ("generate",)} <= set(parsers)
    checked = 0
    for path, parser in parsers.items():
        page = _flat(parser.format_help())
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, SKIPPED):
                continue
            where = f"lmdistill {' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{where}: no help text"
            default = action.default
            if default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
                continue   # nothing to show: no default, or a flag that is off
            if not action.option_strings and action.nargs not in ("?", "*"):
                continue   # a positional that must be given
            value = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
            own = _flat(formatter._expand_help(action))
            assert f"default: {value}" in own, f"{where}: default {value!r} not in its help {own!r}"
            assert f"default: {value}" in page, f"{where}: default {value!r} not on the --help page"
            checked += 1
    assert checked > 60


def test_whitebox_models_have_help(parsers, capsys):
    with pytest.raises(SystemExit):
        main(["quantify", "whitebox", "--help"])
    page = _flat(capsys.readouterr().out)
    assert "--teacher TEACHER local folder or hub id of the reference model" in page
    assert "--student STUDENT local folder or hub id of the model under test" in page


#: The commands that take --limit (others may add theirs: each must mean the same).
LIMITED = {("eval",), ("capture",), ("generate",), ("quantify", "rse"), ("quantify", "whitebox")}


def test_limit_means_the_same_everywhere(parsers, capsys):
    having = {path for path, p in parsers.items() if any("--limit" in a.option_strings for a in p._actions)}
    assert LIMITED <= having
    for path in sorted(having):
        action = next(a for a in parsers[path]._actions if "--limit" in a.option_strings)
        assert action.type is limit_value and "0 = all" in action.help, path
        with pytest.raises(SystemExit) as e:
            main([*path, "--limit", "-1"])
        err = capsys.readouterr().err
        assert e.value.code == 2, path
        assert err.count("\n") == 1 and "argument --limit: must be >= 0 (0 = all), got -1" in err, (path, err)
    assert limit_value("0") == 0 and limit_value("12") == 12
    with pytest.raises(argparse.ArgumentTypeError, match="integer"):
        limit_value("ten")


def test_limit_zero_is_every_item(model_dirs, tmp_path, capsys):
    from lmdistill.quantify.rse import load_prompt_set
    from lmdistill.quantify.whitebox import load_whitebox_items

    assert len(load_prompt_set("arena-hard", 0)[1]) == len(load_whitebox_items("arena-hard", 0)) == 500
    assert len(load_prompt_set("arena-hard", 7)[1]) == 7
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in ("a", "b", "c")))
    out = tmp_path / "g.jsonl"
    argv = ["generate", "--policy", "student", "--student", model_dirs["student"], "--data", str(data),
            "--out", str(out), "--max-new-tokens", "2"]
    assert main([*argv, "--limit", "0"]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert json.loads(Path(f"{out}.meta.json").read_text())["limit"] is None   # recorded as "all"
    assert main(argv) == 0   # the default is 0 = all: the same settings, nothing left to do
    assert len(out.read_text().splitlines()) == 3


def test_eval_states_its_cost_before_it_starts(tmp_path, capsys):
    missing = str(tmp_path / "no-model")

    def first_line(*argv) -> tuple[str, str]:
        assert main(["eval", missing, *argv, "--out", str(tmp_path / "e")]) == 2   # the model is looked for later
        lines = capsys.readouterr().err.splitlines()
        assert "no-model" in lines[-1]
        return lines[0], lines[-1]

    cost, _ = first_line("--benchmarks", "dolly", "--limit", "10")
    assert cost == ("[eval] 1 model(s) x 1 benchmark(s) (dolly 10 examples) x 5 seed(s) x at most 256 new tokens: "
                    "up to 12,800 generated tokens; for a quick check: --seeds 10 --max-new-tokens 64")
    cost, _ = first_line("--benchmarks", "dolly,vicuna", "--seeds", "10", "--max-new-tokens", "64")
    n = {b: len(load_examples(b).examples) for b in ("dolly", "vicuna")}   # no --limit: every example
    assert cost == (f"[eval] 1 model(s) x 2 benchmark(s) (dolly {n['dolly']}, vicuna {n['vicuna']} examples) x 1 "
                    f"seed(s) x at most 64 new tokens: up to {(n['dolly'] + n['vicuna']) * 64:,} generated tokens")
    cost, _ = first_line("--benchmarks", "dolly", "--limit", "0", "--num-samples", "2")
    assert f"(dolly {n['dolly']} examples) x 5 seed(s) x 2 samples" in cost
    assert cost.endswith("--seeds 10 --max-new-tokens 64 --limit 50")


def test_print_config_without_models_marks_them_required(tmp_path, capsys):
    assert main(["train", "kd", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "\nstudent: ''  # required: a model folder or hub id\n" in printed
    assert "\nteacher: ''  # required by this recipe" in printed
    assert main(["train", "sft", "--print-config"]) == 0
    sft = capsys.readouterr().out
    assert "\nteacher: ''\n" in sft and "student: ''  # required" in sft   # SFT reads no teacher
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(printed)
    assert yaml.safe_load(printed)["student"] == ""
    models = ["student=s", "teacher=t"]
    assert load_config(recipe, models) == load_config("kd", models)   # the printed file is the recipe
    assert main(["train", str(recipe)]) == 2                           # training still needs a student
    assert "student: is required" in capsys.readouterr().err
    assert main(["train", "kd", "student=s"]) == 2
    assert "teacher: is required" in capsys.readouterr().err
    assert main(["train", "kd", "lr=-1", "--print-config"]) == 2       # every other check still holds
    assert "lr: must be" in capsys.readouterr().err


def test_demo_out_is_the_report_folder(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(demo_cmd, "run_demo", lambda preset, out, workers=None: calls.append((preset, out)))
    monkeypatch.setattr(demo_cmd, "run_real_demo",
                        lambda preset, out, independent: calls.append((preset, out, independent)))
    assert main(["demo", "--preset", "full", "--out", str(tmp_path / "d")]) == 0
    assert main(["demo", "--preset", "smollm2-smoke", "--out", str(tmp_path / "s")]) == 0
    assert main(["demo", "--preset", "smollm2-smoke", "--no-independent", "--out", str(tmp_path / "n")]) == 0
    assert main(["demo"]) == 0
    assert calls == [("full", str(tmp_path / "d")), ("smollm2-smoke", str(tmp_path / "s"), True),
                     ("smollm2-smoke", str(tmp_path / "n"), False), ("quick", "runs/demo/quick")]
    assert main(["demo", "--preset", "quick", "--no-independent"]) == 2 and len(calls) == 4   # refused, not ignored


# ---------------------------------------------------------------------------------------------- template: auto
def without_chat_template(src: str, dst: Path) -> str:
    """A copy of the model folder ``src`` whose tokenizer has no chat template (everything else the same)."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    assert not load_tokenizer(str(dst)).chat_template and load_tokenizer(src).chat_template
    return str(dst)


@pytest.fixture(scope="module")
def plain_teacher(model_dirs, tmp_path_factory):
    return without_chat_template(model_dirs["teacher"], tmp_path_factory.mktemp("plain") / "teacher")


def test_resolve_template_picks_chat_only_when_every_tokenizer_has_one(tokenizer, plain_teacher):
    plain = load_tokenizer(plain_teacher)
    assert resolve_template("auto", {"student": tokenizer, "teacher": tokenizer}) == (
        "chat", "template: chat (both tokenizers have a chat template; template=alpaca to override)")
    assert resolve_template("auto", {"student": tokenizer}, override="--template ") == (
        "chat", "template: chat (the student's tokenizer has a chat template; --template alpaca to override)")
    assert resolve_template("auto", {"student": tokenizer, "teacher": None})[0] == "chat"   # served: not known here
    assert resolve_template("auto", {"student": tokenizer, "teacher": plain}) == (
        "alpaca", "template: alpaca (the teacher's tokenizer has no chat template)")
    assert resolve_template("auto", {"student": plain, "teacher": plain}) == (
        "alpaca", "template: alpaca (neither tokenizer has a chat template)")
    assert resolve_template("alpaca", {"student": tokenizer}) == ("alpaca", None)
    assert resolve_template("chat", {"student": tokenizer, "teacher": tokenizer}) == ("chat", None)
    with pytest.raises(ConfigError, match="template: chat needs a chat template, and the teacher's tokenizer has "
                                          "none; use template=alpaca"):
        resolve_template("chat", {"student": tokenizer, "teacher": plain})
    with pytest.raises(ConfigError, match="must be one of auto, alpaca, chat"):
        resolve_template("chatml", {"student": tokenizer})


def _cfg(recipe, model_dirs, teacher, tmp_path, *extra):
    return load_config(recipe, [f"student={model_dirs['student']}", f"teacher={teacher}", f"output_dir={tmp_path}",
                                "valid_data=", "max_train_examples=4", "max_length=96", "max_prompt_length=80",
                                "device=cpu", *extra])


def test_training_resolves_auto_from_both_tokenizers(model_dirs, plain_teacher, tmp_path, capsys):
    assert load_config("kd", ["student=s", "teacher=t"]).template == "auto"   # the default
    both = _cfg("kd", model_dirs, model_dirs["teacher"], tmp_path)
    tok = load_tokenizers(both)
    assert both.template == "chat"
    assert capsys.readouterr().out == ("[lmdistill] template: chat (both tokenizers have a chat template; "
                                       "template=alpaca to override)\n")
    rows, _, _ = load_rows(both, tok)
    examples = load_examples("dolly:train").examples[:4]
    want, _ = tokenize_examples(examples, tok, template="chat", max_prompt_length=80, max_length=96)
    assert [r.prompt_ids for r in rows] == [r.prompt_ids for r in want]   # the rows are built with it
    mixed = _cfg("kd", model_dirs, plain_teacher, tmp_path)
    load_tokenizers(mixed)
    assert mixed.template == "alpaca"
    assert "template: alpaca (the teacher's tokenizer has no chat template)" in capsys.readouterr().out
    alone = _cfg("sft", model_dirs, "", tmp_path)
    load_tokenizers(alone)
    assert alone.template == "chat" and "the student's tokenizer has a chat template" in capsys.readouterr().out
    explicit = _cfg("kd", model_dirs, model_dirs["teacher"], tmp_path, "template=alpaca")
    load_tokenizers(explicit)
    assert explicit.template == "alpaca" and capsys.readouterr().out == ""   # said only when chosen for you
    early = resolve_config_template(_cfg("kd", model_dirs, plain_teacher, tmp_path))   # before a run's pieces
    assert early.template == "alpaca" and "the teacher's tokenizer has no chat template" in capsys.readouterr().out
    load_tokenizers(early)
    assert early.template == "alpaca" and capsys.readouterr().out == ""   # said once
    with pytest.raises(ConfigError, match="the teacher's tokenizer has none"):
        load_tokenizers(_cfg("kd", model_dirs, plain_teacher, tmp_path, "template=chat"))
    with pytest.raises(ConfigError, match="template: must be one of auto, alpaca, chat, got 'Chat'"):
        _cfg("kd", model_dirs, plain_teacher, tmp_path, "template=Chat")


def test_a_run_records_the_template_it_used_and_prints_json_as_typed(model_dirs, tmp_path, capsys):
    out = tmp_path / "runs é 日本"
    assert main(["train", "sft", f"student={model_dirs['student']}", f"output_dir={out}", "valid_data=",
                 "max_train_examples=4", "max_steps=1", "batch_size=2", "micro_batch_size=2", "max_length=96",
                 "max_prompt_length=80", "device=cpu", "progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "[lmdistill] template: chat (the student's tokenizer has a chat template" in printed
    result = printed[printed.index("{"):]
    assert "runs é 日本" in result and "\\u" not in result and json.loads(result)["final"].startswith(str(out))
    assert json.loads((out / "config.json").read_text())["template"] == "chat"


def test_generate_and_capture_record_the_resolved_template(model_dirs, plain_teacher, tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    base = ["generate", "--student", model_dirs["student"], "--data", "dolly", "--limit", "2", "--max-new-tokens", "2"]
    assert main([*base, "--policy", "student", "--out", str(out)]) == 0
    assert json.loads(Path(f"{out}.meta.json").read_text())["template"] == "chat"
    assert ("[lmdistill] template: chat (the student's tokenizer has a chat template; --template alpaca to override)"
            in capsys.readouterr().err)
    plain = tmp_path / "p.jsonl"
    assert main([*base, "--policy", "teacher", "--teacher", plain_teacher, "--out", str(plain)]) == 0
    assert json.loads(Path(f"{plain}.meta.json").read_text())["template"] == "alpaca"
    assert "template: alpaca (the teacher's tokenizer has no chat template)" in capsys.readouterr().err
    prompt = json.loads(plain.read_text().splitlines()[0])["prompt"]
    assert "### Instruction:" in prompt   # the Alpaca prompt was used
    cache = tmp_path / "cache"
    assert main(["capture", "--teacher", model_dirs["teacher"], "--data", "dolly:train", "--out", str(cache),
                 "--limit", "4", "--top-k", "4", "--max-length", "96", "--max-prompt-length", "80",
                 "--no-progress"]) == 0
    assert json.loads((cache / "manifest.json").read_text())["template"] == "chat"   # the resolved one, not auto
    cfg = _cfg("kd", model_dirs, f"cache:{cache}", tmp_path)
    capsys.readouterr()
    load_tokenizers(cfg)   # auto with a cache: the template the cache was captured with
    assert cfg.template == "chat" and f"(the template cache:{cache} was captured with)" in capsys.readouterr().out
