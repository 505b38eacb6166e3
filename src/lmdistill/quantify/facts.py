"""ICE's fact (the target's true identity) for the models the package can get, found from the target spec.

The reference ships one fact per model it tests (Aegis1863/LLMs-Distillation-Quantification,
``identity_jailbreak/run_gptfuzzer.py:12-22``, e.g. ``gemini_fact``, and passes the target's to the judge,
``:56, :72``). lmdistill's built-in facts are those of the models ``lmdistill models get`` converts
(``models.pretrained.PRETRAINED``, ``system_fact``): SmolLM2-135M-Instruct, "I am SmolLM, trained by Hugging Face",
and Gemma-3-270M, "I am Gemma, an open model trained by Google". ``--fact`` overrides them, and is required for
any other model.

``builtin_fact(spec)`` follows a local target back to the model it came from, at most ``MAX_HOPS`` folders:

1. ``lmdistill-source.json`` (written by ``models get``): its ``name``;
2. ``prune.json`` (``models prune``): its ``source`` folder;
3. a training run's export (``RUN/final``, ``RUN/best``): ``RUN/config.json``'s ``student`` (the student's
   starting weights, so a distilled student is judged against its own base's identity, not its teacher's);
4. ``README.md``'s first heading (the converted folder's model card: ``# NAME (converted by lmdistill)``) and
   ``config.json``'s ``_name_or_path``, matched by name.

A served target (``openai:MODEL@URL``) or a hub id is matched by name: the registered name
(``smollm2-135m-instruct``), the upstream repository (``HuggingFaceTB/SmolLM2-135M-Instruct``) or its last part,
compared without case or punctuation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmdistill.errors import ConfigError
from lmdistill.models.pretrained import PRETRAINED, SOURCE_FILE

MAX_HOPS = 6
_CARD_HEADING = re.compile(r"^#\s+(\S+)\s+\(converted by lmdistill\)")


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _aliases() -> dict[str, str]:
    """Normalised name -> registered name: the registered name, the upstream repository and its last part."""
    out = {}
    for name, reg in PRETRAINED.items():
        out[_key(name)] = name
        repo = re.search(r"huggingface\.co/([\w.-]+/[\w.-]+)", reg.upstream)
        if repo:
            out[_key(repo.group(1))] = name
            out[_key(repo.group(1).split("/")[1])] = name
    return out


def registered_name(name: str) -> str | None:
    """The registered model ``name`` refers to (``None`` when it names none)."""
    return _aliases().get(_key(name)) if name else None


def fact_of(name: str) -> str:
    return PRETRAINED[name].system_fact


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _folder_origin(folder: Path) -> tuple[str | None, Path | None, str]:
    """``(registered name, folder it came from, how)`` for one folder; both ``None`` when nothing says."""
    source = _read_json(folder / SOURCE_FILE)
    if registered_name(str(source.get("name", ""))):
        return registered_name(source["name"]), None, f"{folder / SOURCE_FILE}"
    pruned = _read_json(folder / "prune.json").get("source")
    if isinstance(pruned, str) and pruned:
        return None, Path(pruned), f"{folder / 'prune.json'}"
    run = _read_json(folder.parent / "config.json") if (folder / "config.json").is_file() else {}
    if isinstance(run.get("student"), str) and run["student"]:
        return None, Path(run["student"]), f"{folder.parent / 'config.json'} (student)"
    card = (folder / "README.md").read_text(encoding="utf-8").splitlines()[:1] if (folder / "README.md").is_file() else []
    heading = _CARD_HEADING.match(card[0]) if card else None
    if heading and registered_name(heading.group(1)):
        return registered_name(heading.group(1)), None, f"{folder / 'README.md'}"
    origin = str(_read_json(folder / "config.json").get("_name_or_path", ""))
    if registered_name(origin) or registered_name(Path(origin).name):
        return registered_name(origin) or registered_name(Path(origin).name), None, f"{folder / 'config.json'}"
    if origin and Path(origin).is_dir() and Path(origin).resolve() != folder.resolve():
        return None, Path(origin), f"{folder / 'config.json'} (_name_or_path)"
    return None, None, ""


def builtin_fact(spec: str) -> tuple[str, str] | None:
    """``(fact, how it was found)`` for the target ``spec``, or ``None`` when no built-in fact applies."""
    if spec.startswith("openai:"):
        model = spec[len("openai:"):].rsplit("@", 1)[0]
        name = registered_name(model) or registered_name(model.split("/")[-1])
        return (fact_of(name), f"built-in fact of {name} (served model name {model!r})") if name else None
    folder, trail = Path(spec), []
    for _ in range(MAX_HOPS):
        if not folder.is_dir():
            name = registered_name(str(folder)) or registered_name(folder.name)
            return (fact_of(name), f"built-in fact of {name} ({' -> '.join([*trail, str(folder)])})") if name else None
        name, parent, how = _folder_origin(folder)
        if name:
            return fact_of(name), f"built-in fact of {name} ({' -> '.join([*trail, how])})"
        if parent is None:
            return None
        trail.append(how)
        folder = parent
    return None


def resolve_fact(fact: str | None, target: str) -> tuple[str, str]:
    """``(fact, where it came from)``: ``fact`` when given, else the target's built-in fact; a clear error when
    there is neither."""
    if fact is not None and fact.strip():
        return fact, "--fact"
    found = builtin_fact(target)
    if found is None:
        raise ConfigError(
            f"--fact is required for --target {target}: it is none of the models with a built-in fact "
            f"({', '.join(PRETRAINED)}; found from a folder of `lmdistill models get`, a pruned or trained copy of one, "
            "or the model's name). Give the target's true identity, e.g. --fact 'I am Qwen, developed by Alibaba Cloud'")
    return found
