"""The alignment coverage as a training metric (issue 32, item 4): each step's ``uld/coverage`` (``gold/coverage``) in
metrics.jsonl is the share of the step's response bytes that lie in one-to-one groups, the micro-batches weighted by
their student tokens, recomputed here byte by byte from the two tokenizations (no group walk)."""

from __future__ import annotations

import json

import pytest
import torch

from lmdistill.losses.objective import Objective, check_objective
from lmdistill.models import build_model, load_model
from lmdistill.models.tokenizer import train_sp_tokenizer
from lmdistill.teachers import open_teacher
from lmdistill.train import load_config, train
from test_cross_tokenizer import inputs, rows_of


@pytest.fixture(scope="module")
def sp_teacher(tmp_path_factory):
    """A micro teacher whose tokenizer is a SentencePiece-style BPE (another family than the student's)."""
    path = tmp_path_factory.mktemp("sp") / "teacher"
    build_model("micro", path, tokenizer=train_sp_tokenizer(), seed=1)
    return str(path)


def brute_coverage(teacher, rows) -> tuple[int, int]:
    """``(bytes whose student token and teacher token span exactly the same bytes, all response bytes)``."""
    one = total = 0
    for row in rows:
        s_ends, _, t_ends = teacher.tokenizers.response(list(row.response_ids), "test")
        spans = [{(a, b) for a, b in zip([0, *ends[:-1]], ends) if b > a} for ends in (s_ends, t_ends)]
        n = max(s_ends, default=0)
        owner = [[next(sp for sp in side if sp[0] <= i < sp[1]) for i in range(n)] for side in spans]
        one += sum(s == t for s, t in zip(*owner))
        total += n
    return one, total


class SeenRows:
    """Trainer callbacks that keep each step's micro-batches of rows."""

    def __init__(self):
        self.steps: dict[int, list] = {}

    def on_step_begin(self, run, step):
        self.steps[step] = []

    def on_sequences(self, run, step, seqs):
        self.steps[step].append(list(seqs.rows))

    def on_step_end(self, run, step, metrics):
        pass


@pytest.mark.parametrize("recipe", ["uld", "gold"])
def test_each_steps_coverage_is_the_token_weighted_share_of_bytes_in_one_to_one_groups(recipe, model_dirs, sp_teacher,
                                                                                       tokenizer, tmp_path):
    out, seen = tmp_path / recipe, SeenRows()
    cfg = load_config(recipe, [f"student={model_dirs['student']}", f"teacher=xtok:{sp_teacher}", f"output_dir={out}",
                               "max_train_examples=16", "batch_size=4", "micro_batch_size=2", "valid_data=",
                               "eval_steps=1000", "save_steps=1000", "progress=false", "max_length=96",
                               "max_prompt_length=80", "device=cpu", "policy=gold", "max_steps=3"])
    train(cfg, callbacks=[seen])
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    teacher = open_teacher(f"xtok:{sp_teacher}", tokenizer=tokenizer)
    for record in logged:
        micro = seen.steps[record["step"] - 1]
        assert len(micro) == 2
        tokens = [sum(len(r.response_ids) for r in rows) for rows in micro]
        shares = [one / total for one, total in (brute_coverage(teacher, rows) for rows in micro)]
        want = sum(s * n for s, n in zip(shares, tokens)) / sum(tokens)
        assert record[f"{recipe}/coverage"] == pytest.approx(want, abs=1e-6)
        assert 0.05 < want < 0.95   # two tokenizer families: some groups are n:m, most bytes not
    assert len(logged) == 3 and len({r[f"{recipe}/coverage"] for r in logged}) > 1


def test_the_objective_reports_only_what_its_terms_measured_in_the_last_forward(model_dirs, sp_teacher, tokenizer):
    objective = Objective(check_objective([{"term": "sft", "weight": 1.0}, {"term": "uld", "name": "u", "weight": 1.0}]))
    teacher = open_teacher(f"xtok:{sp_teacher}", tokenizer=tokenizer)
    rows = rows_of(tokenizer, 3)
    with torch.no_grad():
        objective(inputs(load_model(model_dirs["student"]), teacher, rows, tokenizer))
    one, total = brute_coverage(teacher, rows)
    assert objective.stats == {"u/coverage": (pytest.approx(one / total, abs=1e-12), "sequences")}
    objective.terms[1].last_stats = {"stale": 1.0}
    with torch.no_grad():
        objective(inputs(load_model(model_dirs["student"]), teacher, rows[:1], tokenizer))
    one, total = brute_coverage(teacher, rows[:1])
    assert objective.stats == {"u/coverage": (pytest.approx(one / total, abs=1e-12), "sequences")}
