"""Turn examples into prompt ids, response ids and a loss mask; the MiniLLM length filter.

MiniLLM protocol: prompts longer than ``max_prompt_length`` (256) tokens are dropped, never cut;
responses are cut so prompt + response fits ``max_length`` (512). The response ends with EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmdistill.data.records import Example
from lmdistill.data.templates import format_prompt


@dataclass
class TokenizedExample:
    id: str
    prompt_ids: list[int]
    response_ids: list[int]  # gold response + EOS (may be empty for prompt-only use)
    example: Example | None = None

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def loss_mask(self) -> list[int]:
        """1 on response tokens (the tokens the model is trained to predict), 0 on the prompt."""
        return [0] * len(self.prompt_ids) + [1] * len(self.response_ids)


@dataclass
class FilterReport:
    """What a filter removed: the count, the reason and the ids."""

    name: str
    kept: int
    removed_ids: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def removed(self) -> int:
        return len(self.removed_ids)

    def __str__(self) -> str:
        return f"{self.name}: kept {self.kept}, removed {self.removed} ({self.reason})"


def tokenize_example(ex: Example, tokenizer, *, template: str = "alpaca", max_length: int = 512,
                     with_response: bool = True) -> TokenizedExample:
    prompt = format_prompt(ex, template, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if template == "chat" and tokenizer.bos_token_id is not None and prompt.startswith(tokenizer.bos_token or "\0"):
        pass  # chat templates carry their own BOS in the text
    response_ids: list[int] = []
    if with_response:
        response_ids = tokenizer(ex.output, add_special_tokens=False)["input_ids"]
        room = max(max_length - len(prompt_ids) - 1, 0)
        response_ids = response_ids[:room] + [tokenizer.eos_token_id]
    return TokenizedExample(ex.id, prompt_ids, response_ids, ex)


def tokenize_examples(examples: list[Example], tokenizer, *, template: str = "alpaca",
                      max_prompt_length: int = 256, max_length: int = 512,
                      with_response: bool = True) -> tuple[list[TokenizedExample], list[FilterReport]]:
    """Tokenize and apply the prompt-length filter; returns the rows and one report per filter."""
    out, too_long = [], []
    for ex in examples:
        tok = tokenize_example(ex, tokenizer, template=template, max_length=max_length, with_response=with_response)
        if len(tok.prompt_ids) > max_prompt_length:
            too_long.append(ex.id)
            continue
        out.append(tok)
    report = FilterReport("prompt-length filter", len(out), too_long,
                          f"prompt longer than {max_prompt_length} tokens")
    return out, [report]


def filter_empty_outputs(examples: list[Example]) -> tuple[list[Example], FilterReport]:
    """Drop rows whose output is empty after stripping (used with skip mode on training data)."""
    kept = [e for e in examples if e.output.strip()]
    removed = [e.id for e in examples if not e.output.strip()]
    return kept, FilterReport("empty-output filter", len(kept), removed, "empty output")
