"""GPTFuzz's 77 jailbreak templates (MIT, vendored in ``quantify/data``) and how a question goes into one."""

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


def fill(template: str, question: str) -> str:
    """Put ``question`` where the placeholder is; a template that lost it gets the question appended."""
    if PLACEHOLDER in template:
        return template.replace(PLACEHOLDER, question)
    return f"{template.rstrip()}\n\n{question}"


def strip_placeholder(template: str) -> str:
    return template.replace(PLACEHOLDER, " ")
