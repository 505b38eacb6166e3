"""Recipes: a YAML delta over ``recipes/base.yaml`` plus ``key=value`` overrides, resolved into a checked
:class:`~lmdistill.train.config.TrainConfig` before any model loads.

Resolution order: ``TrainConfig`` defaults, then the recipe's base (``base.yaml`` unless the recipe names another
with ``base: NAME`` or ``base: none``), then the recipe, then the overrides. ``sampling`` merges key by key (it is
the generation package's ``SamplingConfig``); ``policy`` too while its name stays (another name replaces it:
another policy's parameters); ``objective`` is replaced as a whole, or edited entry by entry with
``objective.NAME.KEY=VALUE`` (a NAME not in the list adds that term with weight 1).

An unknown key names the closest valid key; a wrong type names the key and the type it needs; a key of an older
format (``loss``, ``kd_weight``, ``tau0``, ``replay_capacity``, ``sampling.switch_tau0``, ...) names its replacement
(``recipe_compat.py``).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path

import yaml

from lmdistill.errors import ConfigError
from lmdistill.generation.config import MOVED_TO_POLICY
from lmdistill.generation.policies.base import scalar
from lmdistill.losses.objective import TERMS, entry_name
from lmdistill.train.config import TrainConfig
from lmdistill.train.recipe_compat import MOVED_REPLAY, OLD_OBJECTIVE, OLD_SAMPLING, moved_key_error, \
    old_format_error, old_override_error

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
BASE_RECIPE = "base"

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}unknown key {key!r}{hint} Valid keys: {', '.join(sorted(FIELDS))}")


def _coerce(key: str, value, where: str):
    want = HINTS[key]
    if key == "data" and isinstance(value, dict):   # several sources, {NAME: PATH} (train/teacher_set.py)
        return value
    if want in (bool, int, float):
        out = scalar(value, want)   # an int key never takes 2.5
        if out is not None:
            return out
    elif want is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif want is dict:
        if isinstance(value, dict):
            return value
        if key == "policy" and isinstance(value, str):   # policy: NAME is policy: {name: NAME}
            return {"name": value}
    elif want is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
    hint = " (YAML reads yes/no/on/off as booleans: quote the value)" if want is str and isinstance(value, bool) else ""
    raise ConfigError(f"{where}key {key!r} must be {want.__name__}, got {type(value).__name__} {value!r}{hint}")


def parse_override(text: str) -> tuple[str, object]:
    """``key=value``; the value is parsed as YAML (numbers, booleans, lists, dicts). Dotted keys set entries of
    a mapping (``sampling.top_p=0.9``) or of an objective term (``objective.jsd.beta=0.9``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if HINTS.get(key) is str and not (key == "data" and raw.lstrip().startswith("{")):   # data={a: x, b: y}: a map
        return key, raw   # a text key takes the text as typed: mixed_precision=no is "no", not YAML's False
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key, value


# ---------------------------------------------------------------------------------------------- recipes
def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem != BASE_RECIPE)


def recipe_path(recipe: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe file, or the built-in recipe of that name."""
    path = Path(recipe)
    if relative_to is not None and not path.is_absolute():
        near = relative_to.parent / path
        if near.is_file():
            return near
    if path.is_file():
        return path
    builtin = RECIPES_DIR / f"{recipe}.yaml"
    if builtin.is_file() and path.suffix != ".yaml":
        return builtin
    raise ConfigError(f"{recipe}: no such recipe file or built-in recipe ({', '.join(builtin_recipes())})")


def read_recipe(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: must be a mapping of key: value")
    return loaded


def merge(values: dict, delta: dict) -> dict:
    """``delta`` over ``values``: mappings merge key by key, everything else is replaced; a policy of another name
    replaces the policy (its parameters are another policy's)."""
    out = dict(values)
    for k, v in delta.items():
        other = k == "policy" and isinstance(v, dict) and "name" in v and v["name"] != (out.get(k) or {}).get("name")
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) and not other else v
    return out


def recipe_values(recipe: str | Path, relative_to: Path | None = None, seen: tuple = ()) -> dict:
    """The recipe's values over its base chain, type-checked, before overrides."""
    path = recipe_path(recipe, relative_to)
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself")
    loaded = read_recipe(path)
    where = f"{path}: "
    old = [k for k in loaded if k in OLD_SAMPLING or k in OLD_OBJECTIVE]
    if old:
        raise old_format_error(loaded, where)
    for k in loaded:
        if k in MOVED_REPLAY:
            raise ConfigError(f"{where}{moved_key_error(k, loaded[k])}")
    base = loaded.pop("base", None if path.stem == BASE_RECIPE and path.parent == RECIPES_DIR else BASE_RECIPE)
    values = {}
    if base not in (None, "none"):
        values = recipe_values(base, path, seen + (path.resolve(),))
    for k, v in loaded.items():
        if k not in FIELDS:
            raise _unknown(k, where)
        loaded[k] = _coerce(k, v, where)
    return merge(values, loaded)


def _set_term(objective: list, sub: str, value) -> list:
    name, _, key = sub.partition(".")
    if not key:
        raise ConfigError(f"override: objective.{sub} needs a key: objective.NAME.KEY=VALUE "
                          f"(e.g. objective.{name}.weight=0.5)")
    entries = [dict(e) for e in objective]
    hit = [e for e in entries if entry_name(e) == name]
    if not hit:
        if name not in TERMS:
            have = ", ".join(entry_name(e) for e in entries)
            raise ConfigError(f"override: objective has no term named {name!r} (it has {have}; "
                              f"terms to add: {', '.join(TERMS)})")
        hit = [{"term": name, "weight": 1.0}]
        entries.append(hit[0])
    if key == "term":
        raise ConfigError("override: a term's kind cannot change; set its weight to 0 and add another")
    hit[0][key] = value
    return entries


def _set_nested(mapping: dict, dotted: str, value) -> dict:
    """A copy of ``mapping`` with ``a.b.c`` set to ``value`` (``policy.generator.rounds=2``); a name given as text
    for a nested mapping (``policy.generator=scrg``) is that mapping's name."""
    out = dict(mapping)
    head, _, rest = dotted.partition(".")
    if rest:
        inner = out.get(head)
        inner = {"name": inner} if isinstance(inner, str) else dict(inner or {})
        out[head] = _set_nested(inner, rest, value)
    else:
        out[head] = value
    return out


def load_config(recipe: str | Path | None = None, overrides: list[str] = (), *,
                require_models: bool = True) -> TrainConfig:
    """The recipe's config with ``overrides`` applied, checked (``TrainConfig.check``; ``require_models=False``
    lets the student and teacher be missing, for ``--print-config``)."""
    values: dict = recipe_values(recipe) if recipe is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        top, _, sub = key.partition(".")
        if top in OLD_SAMPLING or top in OLD_OBJECTIVE:
            raise old_override_error(key, value)
        if top in MOVED_REPLAY or (top == "sampling" and sub in MOVED_TO_POLICY):
            raise ConfigError(f"override: {moved_key_error(key, value)}")
        if top not in FIELDS:
            raise _unknown(top, "override: ")
        if sub and top == "objective":
            values["objective"] = _set_term(values.get("objective", FIELDS[top].default_factory()), sub, value)
        elif sub:
            if HINTS[top] is not dict:
                raise ConfigError(f"override: {top!r} is not a mapping; use {top}=VALUE")
            values[top] = _set_nested(values.get(top, FIELDS[top].default_factory()), sub, value)
        else:
            values = merge(values, {top: _coerce(top, value, "override: ")})
    return TrainConfig(**values).check(require_models)


def config_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (``lmdistill train ... --print-config``); loadable as a recipe. A student or a
    teacher the run needs but the config lacks is printed empty and marked ``# required``."""
    text = yaml.safe_dump({"base": "none", **dataclasses.asdict(cfg)}, sort_keys=False, default_flow_style=None,
                          width=120)
    marks = {}
    if not cfg.student:
        marks["student"] = "required: a model folder or hub id"
    if not cfg.teacher and not cfg.teachers and cfg.needs_teacher:
        marks["teacher"] = ("required by this recipe: a model folder or hub id, cache:DIR or openai:NAME@URL "
                             "(xtok:... for one of another tokenizer)")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        key = line.partition(":")[0]
        if key in marks and line == f"{key}: ''":
            lines[i] = f"{line}  # {marks[key]}"
    return "\n".join(lines) + "\n"
