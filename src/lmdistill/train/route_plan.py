"""A step's micro-batches when several teachers read its rows (``teachers:``), and each teacher's share of the loss.

Each process cuts its rows of the step into micro-batches of one teacher each: its rows grouped by the teacher
they name (``Teacher.route``; the groups in the order of ``teachers:``, each keeping the rows' order), each group
cut into micro-batches of ``micro_batch_size``. The trainer gives the terms ``teacher.given(rows)``, the member
itself, so every micro-batch's losses belong to one teacher: ``loss/TERM@NAME`` and ``tokens@NAME`` are exact
shares, ``sum over NAME of loss/TERM@NAME = loss/TERM``. Every term is weighted by its share of its token set's
global count (``run.py``), so cutting the step's rows into other micro-batches leaves the step's objective as it
is; with one teacher (no routes) the micro-batches are the ones a single-teacher run cuts.

With several processes, every process runs the same sequence of micro-batches, teacher by teacher: a teacher
sharded by FSDP2 (and the student) gathers its weights in a collective at each forward, which all processes must
enter together. Every process knows the step's whole batch and each row's teacher, so each computes the same plan:
for each teacher the most micro-batches any process has; a process with fewer adds stand-ins, a micro-batch of one
row of that teacher from the step's batch (gold sequences, weight 0: its forwards run, its losses count nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmdistill.losses.model_forward import shifted
from lmdistill.train.data_order import rank_slice


@dataclass
class Slot:
    """One micro-batch's rows, the teacher they name (``None``: one teacher reads every row) and its weight (1, or 0
    for a stand-in that keeps the processes in step)."""

    rows: list
    route: str | None = None
    weight: float = 1.0


def _chunks(rows: list, size: int) -> list[list]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def micro_batches(teacher, batch_rows: list, rank: int, world: int, size: int, order: str = "data") -> list[Slot]:
    """This process's micro-batches of the step's rows ``batch_rows`` (the global batch, in order; process ``r``
    takes rows ``r, r + world, ...``); ``order: length`` sorts each process's rows by length first."""
    ranks = [rank_slice(batch_rows, r, world) for r in range(world)]
    if order == "length":   # similar lengths share a micro-batch: less padding computed
        for rows in ranks:
            rows.sort(key=lambda r: len(r.input_ids))
    routes = None if teacher is None else teacher.route(ranks[rank])
    if routes is None:
        return [Slot(rows) for rows in _chunks(ranks[rank], size)]
    cut = []
    for rows in ranks:
        named = teacher.route(rows)
        cut.append({name: _chunks([r for r, n in zip(rows, named) if n == name], size) for name in teacher.names})
    stand_in = dict(zip(reversed(teacher.route(batch_rows)), reversed(batch_rows)))   # the first row of each
    out = []
    for name in teacher.names:
        out += [Slot(rows, name) for rows in cut[rank][name]]
        missing = max(len(c[name]) for c in cut) - len(cut[rank][name])
        out += [Slot([stand_in[name]], name, 0.0) for _ in range(missing)]
    return out


def reader(teacher, rows):
    """The teacher the terms of a micro-batch of ``rows`` read (``Teacher.given``), or ``None``."""
    return None if teacher is None else teacher.given(rows)


def loss_keys(terms, teacher) -> dict[str, float]:
    """The logged parts of a step, zero: each term's, and with several teachers each term's per teacher
    (``TERM@NAME``), the same keys in the same order on every process."""
    return {**{k: 0.0 for k in terms}, **{f"{k}@{n}": 0.0 for n in (teacher.names if teacher else ()) for k in terms}}


def add_part(logged: dict, term: str, slot: Slot, part: float) -> None:
    logged[term] += part
    if slot.route is not None:
        logged[f"{term}@{slot.route}"] += part


def route_tokens(prepared, token_sets, teacher, all_sum) -> dict[str, float]:
    """``tokens@NAME``: the step's trained tokens each teacher read, over every process (of the sequences, or the
    gold responses when the objective's terms train on those only: the rule of the step's ``tokens``)."""
    token_set = "sequences" if "sequences" in token_sets else "gold"
    out = {}
    for name in (teacher.names if teacher is not None else ()):
        count = sum(float(shifted((g if token_set == "gold" else s).batch)[1].sum()) * slot.weight
                    for g, s, slot in prepared if slot.route == name)
        out[f"tokens@{name}"] = float(all_sum(torch.tensor(count)))
    return out
