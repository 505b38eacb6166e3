"""Several teachers per run, as a recipe names them: the settings' checks, the teacher of each data row, the
template the teachers share, and opening them as one teacher (``teachers.routed`` or ``teachers.mixture``).

    teachers: {math: runs/math-teacher/final, code: cache:runs/code-cache, chat: openai:chat@http://host:8000/v1}
    teacher_route: field     # each row's "teacher" field names its teacher (default)
    # teacher_route: source  # data: {math: data/math.jsonl, code: data/code.jsonl}: each source to its namesake
    # teacher_mix: {math: 0.7, code: 0.3}   # instead of routing: every row reads the weighted mixture (ours)

``teachers:`` and ``teacher:`` exclude each other (verl keeps a default ``teacher_model`` entry beside named ones and
silently drops it, verl docs/algo/opd.md:204-221; we refuse both at once instead). Every member is checked against
what the run asks, as a run's only teacher is (``needs.py``), before anything loads; an unknown or missing name is a
``DataError`` naming each row (``file:line``, id) when the data loads, before any model. A policy that asks the
teacher while generating (``switch``, ``teacher``, ``mixed``, ``teacher_mix``, ``scrg``) is refused: each row has its
own teacher, and such a policy would need one model for a whole batch. ``replay`` and ``rollout`` serve stored
sequences in micro-batches of their own making, so they are refused with routing too.

Each member opens as the run's one teacher would (``setup.load_teacher`` on :func:`member_config`): its options,
its cache check (a cache member is captured on the run's data, or with ``teacher_route: source`` on its source),
its response cache (a served member's in ``RUN/teachers/NAME/``). Only the first member's opening advances the
run's random stream (the others open in a forked one), so a run whose rows all read the first member is the run
with that teacher alone, bit for bit.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from lmdistill.data import load_examples
from lmdistill.data.templates import AUTO, resolve_template
from lmdistill.errors import ConfigError, DataError, Problem
from lmdistill.models import load_tokenizer
from lmdistill.runtime import rank_world
from lmdistill.teachers import (CACHE, LOCAL, SERVED, Capabilities, MixedTeacher, RoutedTeacher, cache_dir,
                                capabilities_of, check_spec, check_use, teacher_kind)
from lmdistill.teachers.cache import read_manifest
from lmdistill.train.sources import policy_class, policy_params

ROUTES = ("field", "source")
#: Policies whose sequences are stored ones served in micro-batches they compose themselves (rows of any teacher).
STORED_SEQUENCES = ("replay", "rollout")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")   # a teacher's name: it becomes part of metric names (loss/fkl@NAME)


def routes_rows(cfg) -> bool:
    """Whether each row is read by the teacher it names (``teachers:`` without ``teacher_mix``)."""
    return bool(cfg.teachers) and not cfg.teacher_mix


def by_source(cfg) -> bool:
    return routes_rows(cfg) and cfg.teacher_route == "source"


def _names(values, key: str) -> None:
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{key}: must be a mapping {{NAME: ...}} with at least one entry, got {values!r}")
    for name, value in values.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"{key}: {name!r} is not a name (letters, digits, _ . -)")
        if key != "teacher_mix" and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{key}.{name}: must name a teacher or a data file, got {value!r}")


def check_teacher_set(cfg, needs) -> None:
    """Refuse settings of several teachers that cannot run (``teachers``, ``teacher_route``, ``teacher_mix``, a
    ``data`` mapping), naming the key; ``needs``: the run's needs (``needs.run_needs``)."""
    if cfg.teacher_route not in ROUTES:
        raise ConfigError(f"teacher_route: must be field (each row's \"teacher\" field) or source (data: "
                          f"{{NAME: PATH}}, each source read by the teacher of its name), got {cfg.teacher_route!r}")
    if isinstance(cfg.data, dict):
        _names(cfg.data, "data")
    if not cfg.teachers:
        if cfg.teacher_mix:
            raise ConfigError("teacher_mix: mixes teachers named in teachers: {NAME: SPEC}; none are")
        if cfg.teacher_route == "source":
            raise ConfigError("teacher_route: source sends each data source to the teacher of its name in "
                              "teachers: {NAME: SPEC}; none are named")
        return
    _names(cfg.teachers, "teachers")
    if cfg.teacher:
        raise ConfigError("teacher: and teachers: are both set; name one teacher with teacher: or several with "
                          "teachers: {NAME: SPEC} (teachers: {default: ...} for one by name)")
    asks = policy_class(cfg.policy).teacher_needs(policy_params(cfg.policy))
    if asks:
        raise ConfigError(f"policy {cfg.policy['name']}: asks the teacher while generating, and with several "
                          "teachers (teachers:) each row has its own; use one teacher (teacher:), or a policy that "
                          "samples from the student (student, gold, ...)")
    for name, spec in cfg.teachers.items():
        teacher_kind(spec)   # a malformed value is refused here, naming its form
        check_spec(spec, needs, f"teachers.{name}: {spec}")
    if cfg.teacher_mix:
        check_mix(cfg, needs)
    elif cfg.policy["name"] in STORED_SEQUENCES:
        raise ConfigError(f"policy {cfg.policy['name']}: serves stored sequences in micro-batches of rows of any "
                          "teacher; with teachers routed per row use another policy, or teacher_mix")
    elif cfg.teacher_route == "source":
        sources = list(cfg.data) if isinstance(cfg.data, dict) else []
        if not sources:
            raise ConfigError(f"teacher_route: source needs data: {{NAME: PATH}} naming a source per teacher "
                              f"({', '.join(cfg.teachers)}), got data: {cfg.data!r}")
        unknown = [s for s in sources if s not in cfg.teachers]
        unread = [t for t in cfg.teachers if t not in sources]
        if unknown or unread:
            raise ConfigError("teacher_route: source reads each data source with the teacher of its name: "
                              + "; ".join([f"data source {s!r} has no teacher of that name" for s in unknown]
                                          + [f"teachers.{t} has no data source of that name" for t in unread]))


def check_mix(cfg, needs) -> None:
    """``teacher_mix: {NAME: weight}``: a positive weight for each teacher, every one giving full distributions;
    the mixture gives logits only (``teachers/mixture.py``), so a term that asks more is refused here."""
    _names(cfg.teacher_mix, "teacher_mix")
    if set(cfg.teacher_mix) != set(cfg.teachers):
        raise ConfigError(f"teacher_mix: must give a weight to each of the teachers ({', '.join(cfg.teachers)}), "
                          f"got {', '.join(cfg.teacher_mix)}")
    for name, w in cfg.teacher_mix.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or w == float("inf"):
            raise ConfigError(f"teacher_mix.{name}: must be a finite number > 0, got {w!r}")
        if not capabilities_of(cfg.teachers[name]).logits:
            raise ConfigError(f"teacher_mix: teachers.{name} ({cfg.teachers[name]}) does not give its full next-token "
                              "distribution; a mixture averages full distributions of teachers that share the "
                              "student's tokenizer (model folders or hub ids)")
    if cfg.teacher_route == "source":
        raise ConfigError("teacher_route: source routes rows; teacher_mix reads every row with the mixture (leave "
                          "teacher_route out)")
    check_use(MixedTeacher.kind, Capabilities(logits=True), needs, "teacher_mix")
    if cfg.chunked_loss:
        raise ConfigError("chunked_loss: reads one teacher's hidden states and LM head; a mixture of teachers has "
                          "neither (set chunked_loss=false, or route rows: leave teacher_mix out)")


def teacher_specs(cfg) -> dict[str, str]:
    """The run's teachers by name: ``teachers:``, or ``{"teacher": SPEC}`` for one, ``{}`` for none."""
    return dict(cfg.teachers) if cfg.teachers else ({"teacher": cfg.teacher} if cfg.teacher else {})


def options_spec(cfg) -> str:
    """The member the one-teacher options of another kind (``teacher_tokenizer``, ``teacher_template``) are checked
    for: the first of ``teachers:`` that is neither a model, a cache nor a server (they share those options)."""
    return next((s for s in cfg.teachers.values() if teacher_kind(s) not in (LOCAL, CACHE, SERVED)), "")


# ---------------------------------------------------------------------------------------------- data rows
def load_train_examples(cfg) -> list:
    """The training examples of ``data`` (one source, or ``{NAME: PATH}`` in order), each named by its source's
    teacher with ``teacher_route: source`` (a row that names another teacher there is a ``DataError``)."""
    if not isinstance(cfg.data, dict):
        return load_examples(cfg.data).examples
    out = []
    for name, path in cfg.data.items():
        examples = load_examples(path).examples
        if by_source(cfg):
            other = [Problem(ex.origin or path, None, "teacher", f"names {ex.teacher!r}, but its source {name!r} is "
                             f"read by teachers.{name} (teacher_route: source)") for ex in examples
                     if ex.teacher and ex.teacher != name]
            if other:
                raise DataError(other)
            examples = [dataclasses.replace(ex, teacher=name) for ex in examples]
        out += examples
    return out


def check_routes(cfg, examples) -> None:
    """Every training row names one of the run's teachers (with one teacher, a row may name none); a
    ``DataError`` listing each row that does not, by ``file:line`` and id."""
    if not routes_rows(cfg):
        return
    names = ", ".join(cfg.teachers)
    problems = []
    for ex in examples:
        if not ex.teacher and len(cfg.teachers) > 1:
            problems.append(Problem(ex.origin or ex.id, None, "teacher", f"is missing (row id {ex.id!r}); with "
                                    f"several teachers ({names}) each row names the one that reads it"))
        elif ex.teacher and ex.teacher not in cfg.teachers:
            problems.append(Problem(ex.origin or ex.id, None, "teacher", f"names {ex.teacher!r} (row id {ex.id!r}), "
                                    f"which is not one of the run's teachers ({names})"))
    if problems:
        raise DataError(problems)


# ---------------------------------------------------------------------------------------------- template, opening
def set_template(cfg, tokenizer) -> tuple[str, str | None]:
    """``template`` resolved for several teachers: ``auto`` is the template the cache members were captured with
    (they must agree), else ``chat`` when the student and every local member have a chat template."""
    roles, recorded = {"student": tokenizer}, {}
    for name, spec in cfg.teachers.items():
        kind = teacher_kind(spec)
        if kind == LOCAL and cfg.template != "alpaca":
            roles[f"teacher {name}"] = load_tokenizer(spec)
        elif kind == CACHE and cfg.template == AUTO and Path(cache_dir(spec)).is_dir():
            manifest = read_manifest(Path(cache_dir(spec)))
            if manifest and manifest.get("template") in ("alpaca", "chat"):
                recorded[name] = manifest["template"]
    if len(set(recorded.values())) > 1:
        raise ConfigError(f"template: auto: the cache teachers were captured with different templates "
                          f"({', '.join(f'{n}: {t}' for n, t in recorded.items())}); capture them with one")
    if recorded:
        template = next(iter(recorded.values()))
        resolve_template(template, roles)   # an explicit chat needs every tokenizer to have one
        return template, f"template: {template} (the template {', '.join(recorded)} were captured with)"
    return resolve_template(cfg.template, roles)


def member_config(cfg, name: str):
    """The run's settings with ``teachers.NAME`` as its one teacher: how that member opens (``setup.load_teacher``)."""
    return dataclasses.replace(cfg, teacher=cfg.teachers[name], teachers={}, teacher_mix={}, teacher_route="field",
                               data=cfg.data[name] if by_source(cfg) else cfg.data,
                               output_dir=str(Path(cfg.output_dir) / "teachers" / name))


def open_teacher_set(cfg, open_one, needs):
    """The members opened by ``open_one(member_config)`` (the first in the run's random stream, the others in a
    forked one), as a :class:`RoutedTeacher` or, with ``teacher_mix``, a :class:`MixedTeacher`; checked."""
    members = {}
    for i, name in enumerate(cfg.teachers):
        if i == 0:
            members[name] = open_one(member_config(cfg, name))
            continue
        with torch.random.fork_rng(devices=[]):
            members[name] = open_one(member_config(cfg, name))
    teacher = MixedTeacher(members, cfg.teacher_mix) if cfg.teacher_mix else RoutedTeacher(members)
    teacher.check(list(needs), "teachers")
    if rank_world()[0] == 0:
        kinds = ", ".join(f"{n} ({m.kind})" for n, m in members.items())
        how = (f"mixed with weights {teacher.weights}" if cfg.teacher_mix else
               "each data source read by its namesake" if by_source(cfg) else "each row read by the one it names")
        print(f"[lmdistill] teachers: {kinds}; {how}", flush=True)
    return teacher
