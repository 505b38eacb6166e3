"""Prompt templates: the Alpaca-style template of MiniLLM's benchmark protocol, and chat templates."""

from __future__ import annotations

from lmdistill.data.records import Example

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

TEMPLATES = ("alpaca", "chat")


def _flatten_history(ex: Example) -> str:
    """Earlier chat turns rendered as plain text for the Alpaca template."""
    turns = [m for m in (ex.messages or [])]
    last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
    before = turns[:last_user]
    text = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in before)
    return text


def alpaca_prompt(ex: Example) -> str:
    inp = ex.input
    if ex.messages:
        inp = "\n\n".join(s for s in (_flatten_history(ex), ex.input) if s)
    if inp.strip():
        return ALPACA_WITH_INPUT.format(instruction=ex.instruction, input=inp)
    return ALPACA_NO_INPUT.format(instruction=ex.instruction)


def chat_messages(ex: Example) -> list[dict]:
    """The conversation up to (not including) the answer."""
    if ex.messages:
        return list(ex.messages)
    content = ex.instruction if not ex.input.strip() else f"{ex.instruction}\n\n{ex.input}"
    return [{"role": "user", "content": content}]


def format_prompt(ex: Example, template: str = "alpaca", tokenizer=None) -> str:
    """Render the prompt text of ``ex``; ``chat`` uses the tokenizer's chat template."""
    if template == "alpaca":
        return alpaca_prompt(ex)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer that has a chat_template")
        return tokenizer.apply_chat_template(chat_messages(ex), tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
