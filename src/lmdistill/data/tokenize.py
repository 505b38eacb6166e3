"""Turn examples into prompt ids, response ids and a loss mask; the MiniLLM length filter.

MiniLLM protocol: prompts longer than ``max_prompt_length`` (256) tokens are dropped, never cut;
responses are cut so prompt + response fits ``max_length`` (512). The response ends with EOS.
Prompts get the tokenizer's default prefix (Gemma's ``<bos>``, ``prompt_prefix.encode_prompts``); responses never do.
Both rules report what they did: the prompt-length filter the rows it removed, the response-length cut the rows it
cut and the share of response tokens lost (tokens lost / response tokens of the kept rows, EOS not counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmdistill.data.prompt_prefix import encode_prompts
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


@dataclass
class CutReport(FilterReport):
    """What a cut shortened: the rows cut (``cut_ids``) and the response tokens it lost of all of them."""

    cut_ids: list[str] = field(default_factory=list)
    tokens_lost: int = 0
    tokens_total: int = 0

    @property
    def cut(self) -> int:
        return len(self.cut_ids)

    @property
    def share_lost(self) -> float:
        """``tokens_lost / tokens_total`` (0 without tokens)."""
        return self.tokens_lost / self.tokens_total if self.tokens_total else 0.0

    def __str__(self) -> str:
        return (f"{self.name}: kept {self.kept}, cut {self.cut} ({self.reason}; {self.tokens_lost} of "
                f"{self.tokens_total} response tokens lost, {100 * self.share_lost:.2f}%)")


def _encode(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of many texts in one call (fast tokenizers encode the batch in parallel, in Rust).

    Texts are encoded whole and cut by ``_assemble`` and the prompt filter, which report what they
    drop, so the tokenizer's own "longer than model_max_length" warning is turned off (``verbose=False``).
    """
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def _assemble(ex: Example, prompt_ids: list[int], response_ids: list[int] | None, tokenizer,
              max_length: int) -> TokenizedExample:
    if response_ids is None:
        return TokenizedExample(ex.id, prompt_ids, [], ex)
    room = max(max_length - len(prompt_ids) - 1, 0)
    return TokenizedExample(ex.id, prompt_ids, response_ids[:room] + [tokenizer.eos_token_id], ex)


def tokenize_example(ex: Example, tokenizer, *, template: str = "alpaca", max_length: int = 512,
                     with_response: bool = True) -> TokenizedExample:
    """Prompt ids (the rendered template) and response ids (the output cut to fit ``max_length``, then EOS)."""
    prompt_ids = encode_prompts([format_prompt(ex, template, tokenizer)], tokenizer)[0]
    response_ids = _encode([ex.output], tokenizer)[0] if with_response else None
    return _assemble(ex, prompt_ids, response_ids, tokenizer, max_length)


def encode_examples(examples: list[Example], tokenizer, *, template: str = "alpaca",
                    with_response: bool = True) -> tuple[list[list[int]], list[list[int] | None]]:
    """The whole prompt ids (rendered template) and response ids (the output, no EOS) of each example, uncut."""
    prompts = encode_prompts([format_prompt(ex, template, tokenizer) for ex in examples], tokenizer)
    responses = _encode([ex.output for ex in examples], tokenizer) if with_response else [None] * len(examples)
    return prompts, responses


def apply_length_limits(examples: list[Example], prompts: list[list[int]], responses: list[list[int] | None],
                        tokenizer, *, max_prompt_length: int = 256, max_length: int = 512
                        ) -> tuple[list[TokenizedExample], list[FilterReport]]:
    """The MiniLLM length rules on encoded examples: drop prompts over ``max_prompt_length``, cut each response to
    ``max_length - len(prompt) - 1`` tokens and append EOS. Reports the rows removed and (with responses) the rows
    cut with the response tokens lost."""
    out, too_long, cut = [], [], []
    lost = total = 0
    for ex, prompt_ids, response_ids in zip(examples, prompts, responses):
        if len(prompt_ids) > max_prompt_length:
            too_long.append(ex.id)
            continue
        row = _assemble(ex, prompt_ids, response_ids, tokenizer, max_length)
        if response_ids is not None:
            total += len(response_ids)
            if len(row.response_ids) - 1 < len(response_ids):
                cut.append(ex.id)
                lost += len(response_ids) - (len(row.response_ids) - 1)
        out.append(row)
    reports = [FilterReport("prompt-length filter", len(out), too_long,
                            f"prompt longer than {max_prompt_length} tokens")]
    if any(r is not None for r in responses):
        reports.append(CutReport("response-length cut", len(out), [], f"response cut so prompt + response + EOS fit "
                                 f"max_length {max_length} tokens", cut_ids=cut, tokens_lost=lost, tokens_total=total))
    return out, reports


def tokenize_examples(examples: list[Example], tokenizer, *, template: str = "alpaca",
                      max_prompt_length: int = 256, max_length: int = 512,
                      with_response: bool = True) -> tuple[list[TokenizedExample], list[FilterReport]]:
    """Tokenize and apply the length rules; returns the rows and one report per rule (the prompt-length filter,
    then, with responses, the response-length cut)."""
    prompts, responses = encode_examples(examples, tokenizer, template=template, with_response=with_response)
    return apply_length_limits(examples, prompts, responses, tokenizer, max_prompt_length=max_prompt_length,
                               max_length=max_length)


def filter_empty_outputs(examples: list[Example]) -> tuple[list[Example], FilterReport]:
    """Drop rows whose output is empty after stripping (used with skip mode on training data)."""
    kept = [e for e in examples if e.output.strip()]
    removed = [e.id for e in examples if not e.output.strip()]
    return kept, FilterReport("empty-output filter", len(kept), removed, "empty output")
