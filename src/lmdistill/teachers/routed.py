"""Several teachers in one run, each row read by the teacher it names: ``teachers: {NAME: SPEC, ...}``.

The peers that take several teachers route each row to one of them and never average: verl reads a field of each
sample (``distillation.teacher_key``, ``data_source`` by default) and refuses a missing or unknown key, sending
every row to the only teacher when there is one (``AsyncTeacherLLMServerManager._resolve_teacher_key``,
verl/experimental/teacher_loop/teacher_manager.py:99-113); TRL's MOPD pull request (huggingface/trl#7215) reads a
``teacher_id`` column and splits each micro-batch's rows by teacher, keeping row order; NeMo-RL's MOPD and Tinker
(one teacher per dataset) do the same. We follow them: a row is read by exactly one teacher.

A :class:`RoutedTeacher` holds its members (teachers of any kind, each opened once) by name. ``route(rows)`` is the
member each row names (its ``teacher`` field, or its data source, filled in by ``train/teacher_set.py``; with one
member, every row); a row naming none, or a name that is not a member, is a ``ConfigError`` naming the row. Its
capabilities are what every member gives (their intersection), and :meth:`check` asks every member for every need,
so a run is refused at start-up naming the member that lacks something. It has no ``steps``: a policy that samples
from the teacher needs one model for a whole batch.

Each method splits the rows by route, asks each member for its rows and stitches the answers back in row order
(:mod:`.stitch`): ``logits`` (whole: by rows; at trained positions: by positions, row-major; the vocabulary cut to
the smallest member's), ``top_k``, ``token_logprobs``, ``sequence_scores``, ``hidden`` and ``layer_states`` (hidden
states by rows; the LM head, its transform and the layer layout must be the members' common one). Methods that get
no rows (``logits``, ``hidden``, ``layer_states``, ``sequence_scores``) read the routes of the rows the teacher was
bound to by ``given(rows)``. Every other method of the Teacher type, one added later included, goes to the member
when all rows name one, and is refused by name when they name several.

The trainer does not need the stitching: it cuts each step's rows into micro-batches of one teacher
(``train/route_plan.py``) and gives the terms ``given(rows)``, which is then the member itself, computing exactly
what it computes as a run's only teacher; each micro-batch's losses then belong to one teacher (per-teacher
metrics). The stitching serves callers that hold rows of several teachers in one batch.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from lmdistill.errors import ConfigError
from lmdistill.teachers.base import Capabilities, Need, Teacher
from lmdistill.teachers.stitch import (groups, shared, stitch_positions, stitch_rows, stitch_sparse, sub_batch)

#: Capabilities asked while generating: one model (or scorer) for a whole batch, which rows of several teachers lack.
GENERATING = frozenset({"steps", "sequence_scores"})


def row_teacher(row) -> str:
    """The teacher a row names: its example's ``teacher`` (a training row holds its example), or ``""``."""
    example = getattr(row, "example", row)
    return (getattr(example, "teacher", "") or "") if example is not None else ""


def describe_row(row) -> str:
    example = getattr(row, "example", row)
    origin = getattr(example, "origin", "") if example is not None else ""
    return f"row {getattr(row, 'id', '?')!r}" + (f" ({origin})" if origin else "")


def common_capabilities(caps: list[Capabilities]) -> Capabilities:
    """What every one of ``caps`` gives: each flag only if all have it, the temperatures all accept (``None``: any),
    and no ``steps``."""
    values = {}
    for f in dataclasses.fields(Capabilities):
        got = [getattr(c, f.name) for c in caps]
        if f.name == "temperatures":
            known = [set(t) for t in got if t is not None]
            values[f.name] = None if not known else tuple(sorted(set.intersection(*known)))
        elif all(isinstance(v, bool) for v in got):
            values[f.name] = all(got)
        else:
            values[f.name] = got[0] if all(v == got[0] for v in got) else f.default
    values["steps"] = False
    return Capabilities(**values)


def trained_counts(batch: dict) -> list[int]:
    """Trained positions per row of a training batch (``loss_mask`` shifted, as the terms read it)."""
    return [int(c) for c in batch["loss_mask"][:, 1:].sum(1).tolist()]


class RoutedTeacher(Teacher):
    """Members by name, each row read by the member it names (module docstring). ``routes``: the rows this view is
    bound to (``given(rows)``), for the methods that get a batch without its rows."""

    kind = "routed"

    def __init__(self, members: dict[str, Teacher], routes: list[str] | None = None):
        if not members:
            raise ConfigError("teachers: name at least one teacher, e.g. teachers: {math: PATH, code: cache:DIR}")
        self.members = dict(members)
        self.names = tuple(self.members)
        self.bound = None if routes is None else list(routes)
        self.capabilities = common_capabilities([m.capabilities for m in self.members.values()])
        vocabs = {m.vocab for m in self.members.values()}
        self.vocab = vocabs.pop() if len(vocabs) == 1 else None
        tokenizers = [m.tokenizer for m in self.members.values()]
        self.tokenizer = tokenizers[0] if all(t is tokenizers[0] for t in tokenizers) else None

    # ------------------------------------------------------------------ routes
    def route(self, rows) -> list[str]:
        out = []
        for row in rows:
            name = row_teacher(row)
            if not name and len(self.names) == 1:
                name = self.names[0]
            elif not name:
                raise ConfigError(f"{describe_row(row)} names no teacher: with several teachers "
                                  f"({', '.join(self.names)}) each row names the one that reads it (its \"teacher\" "
                                  "field, or teacher_route: source)")
            elif name not in self.members:
                raise ConfigError(f"{describe_row(row)} names teacher {name!r}, which is not one of the run's "
                                  f"teachers ({', '.join(self.names)})")
            out.append(name)
        return out

    def given(self, rows) -> Teacher:
        routes = self.route(rows)
        names = set(routes)
        if len(names) == 1:
            return self.members[routes[0]]
        return RoutedTeacher(self.members, routes) if names else self

    def _bound(self, n_rows: int, what: str) -> list[str]:
        """The routes of a batch's rows, for a method that gets the batch alone."""
        if self.bound is None:
            if len(self.names) == 1:
                return [self.names[0]] * n_rows
            raise ConfigError(f"teachers: {what} of a batch needs its rows' teachers: ask teacher.given(rows) of the "
                              "batch's rows, then ask that")
        if len(self.bound) != n_rows:
            raise ConfigError(f"teachers: bound to {len(self.bound)} rows, asked for {what} of {n_rows}")
        return self.bound

    def _groups(self, routes: list[str]) -> list[tuple[Teacher, list[int]]]:
        return [(self.members[name], rows) for name, rows in groups(routes, self.names)]

    # ------------------------------------------------------------------ what it gives, split by rows
    def logits(self, batch: dict, mask, whole: bool):
        parts = self._groups(self._bound(batch["input_ids"].shape[0], "logits"))
        if len(parts) == 1:
            return parts[0][0].logits(batch, mask, whole)
        out = [(rows, m.logits(sub_batch(batch, rows), mask[torch.tensor(rows, device=mask.device)], whole))
               for m, rows in parts]
        vocab = min(t.shape[-1] for _, t in out)
        out = [(rows, t[..., :vocab]) for rows, t in out]
        if whole:
            return stitch_rows(out, batch["input_ids"].shape[0])
        return stitch_positions(out, [int(c) for c in mask.sum(1).tolist()])

    def top_k(self, rows, batch: dict):
        parts = self._groups(self.route(rows))
        if len(parts) == 1:
            return parts[0][0].top_k(rows, batch)
        return stitch_sparse([(idx, m.top_k([rows[i] for i in idx], sub_batch(batch, idx))) for m, idx in parts],
                             trained_counts(batch))

    def token_logprobs(self, rows, batch: dict):
        parts = self._groups(self.route(rows))
        if len(parts) == 1:
            return parts[0][0].token_logprobs(rows, batch)
        return stitch_positions([(idx, m.token_logprobs([rows[i] for i in idx], sub_batch(batch, idx)))
                                 for m, idx in parts], trained_counts(batch))

    def sequence_scores(self, sequences: list[list[int]], wanted: list[list[int]]):
        parts = self._groups(self._bound(len(sequences), "sequence_scores"))
        if len(parts) == 1:
            return parts[0][0].sequence_scores(sequences, wanted)
        return stitch_sparse([(idx, m.sequence_scores([sequences[i] for i in idx], [wanted[i] for i in idx]))
                              for m, idx in parts], [len(w) for w in wanted])

    def hidden(self, batch: dict):
        parts = self._groups(self._bound(batch["input_ids"].shape[0], "hidden states"))
        if len(parts) == 1:
            return parts[0][0].hidden(batch)
        out = [(rows, m.hidden(sub_batch(batch, rows))) for m, rows in parts]
        weight = shared([w for _, (_, w) in out], "the LM head")
        return stitch_rows([(rows, h) for rows, (h, _) in out], batch["input_ids"].shape[0]), weight

    @property
    def transform(self):
        members = self.members.values() if self.bound is None else [m for m, _ in self._groups(self.bound)]
        return shared([m.transform for m in members], "what the forward applies after the LM head")

    def layer_shape(self) -> tuple[int, int]:
        return shared([m.layer_shape() for m in self.members.values()], "the layer layout (blocks, width)")

    def layer_states(self, batch: dict, layers) -> list:
        parts = self._groups(self._bound(batch["input_ids"].shape[0], "layer outputs"))
        if len(parts) == 1:
            return parts[0][0].layer_states(batch, layers)
        out = [(rows, m.layer_states(sub_batch(batch, rows), layers)) for m, rows in parts]
        return [stitch_rows([(rows, states[i]) for rows, states in out], batch["input_ids"].shape[0])
                for i in range(len(layers))]

    # ------------------------------------------------------------------ the run's view of it
    def models(self) -> list:
        return [model for m in self.members.values() for model in m.models()]

    def check(self, needs: list[Need], where: str = "teachers") -> None:
        """Every member meets every need (each in its own way: one by its logits, another by its top-k); a need
        that asks the teacher while generating is refused (``GENERATING``)."""
        generating = [n.who for n in needs if n.any_of and set(n.any_of) <= GENERATING]
        if generating:
            raise ConfigError(f"{where}: {', '.join(generating)} asks the teacher while it generates; several teachers "
                              "(teachers:) each read their own rows, so a policy that samples from or scores with "
                              "the teacher needs one teacher (teacher:)")
        for name, member in self.members.items():
            member.check(needs, f"{where}.{name}")

    def close(self) -> None:
        if self.bound is None:   # a bound view shares its members with the teacher that made it
            for member in self.members.values():
                member.close()


def _passed_on(name: str):
    """A method of the Teacher type that the routed teacher does not split: it goes to the member every row names."""
    params = list(inspect.signature(getattr(Teacher, name)).parameters)
    takes_rows = len(params) > 1 and params[1] == "rows"

    def method(self, *args, **kwargs):
        routes = self.route(args[0]) if takes_rows and args else (self.bound or list(self.names))
        names = sorted(set(routes))
        if len(names) != 1:
            raise ConfigError(f"teachers: {name} cannot be split between teachers ({', '.join(names)}); ask each "
                              "teacher for its own rows (teacher.given(rows))")
        return getattr(self.members[names[0]], name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"``{name}`` of the member all rows name (refused when they name several)."
    return method


for _name, _value in list(vars(Teacher).items()):
    if inspect.isfunction(_value) and not _name.startswith("_") and _name not in vars(RoutedTeacher):
        setattr(RoutedTeacher, _name, _passed_on(_name))
