"""GPTFuzz's 77 jailbreak templates (MIT, vendored in ``quantify/data``) and how a question goes into one.

A template with the placeholder gets the question in its place; one without it (a mutant that lost it, e.g. every
``expand`` mutant) gets the question appended (``join``):

- ``concat`` (default): ``template + question``, nothing in between, as the reference does
  (Aegis1863/LLMs-Distillation-Quantification, ``easyjailbreak/attacker/Gptfuzzer_Identity.py:117-120``, and
  ``:161-164`` in ``single_attack``; its templates carry ``{query}`` where ours carry ``[INSERT PROMPT HERE]``).
- ``blank-line``: the template's trailing whitespace removed, a blank line, then the question (lmdistill before
  issue 29; ``--join blank-line``, and ``--mode lmdistill``'s default).
"""

from __future__ import annotations

import csv
import io
from functools import lru_cache
from importlib import resources

PLACEHOLDER = "[INSERT PROMPT HERE]"


@lru_cache(maxsize=1)
def _load() -> tuple[str, ...]:
    text = resources.files("lmdistill.quantify").joinpath("data/GPTFuzzer.csv").read_text(encoding="utf-8")
    return tuple(row["text"] for row in csv.DictReader(io.StringIO(text)))


def load_templates() -> list[str]:
    """The 77 templates in file order (index = GPTFuzz id)."""
    return list(_load())


JOINS = ("concat", "blank-line")


def fill(template: str, question: str, join: str = "concat") -> str:
    """Put ``question`` where the placeholder is; a template that lost it gets the question appended by ``join``
    (see the module docstring)."""
    if join not in JOINS:
        raise ValueError(f"unknown join {join!r}; choose one of {', '.join(JOINS)}")
    if PLACEHOLDER in template:
        return template.replace(PLACEHOLDER, question)
    if join == "concat":
        return template + question
    return f"{template.rstrip()}\n\n{question}"


def strip_placeholder(template: str) -> str:
    return template.replace(PLACEHOLDER, " ")
