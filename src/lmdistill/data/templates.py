"""Prompt templates: the Alpaca-style template of MiniLLM's benchmark protocol, and chat templates.

``auto`` (the default of training, ``generate`` and ``capture``; the evaluation protocol keeps ``alpaca`` unless
asked) is resolved once per run by ``resolve_template``: ``chat`` when every tokenizer taking part (the student's
and the teacher's; the student's alone without a teacher) has a chat template, else ``alpaca``.
"""

from __future__ import annotations

from lmdistill.data.records import Example
from lmdistill.errors import ConfigError

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
AUTO = "auto"
#: What a setting may name: a template, or ``auto`` (resolved by ``resolve_template`` before any row is built).
TEMPLATE_CHOICES = (AUTO, *TEMPLATES)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(template: str, tokenizers: dict, *, override: str = "template=") -> tuple[str, str | None]:
    """The template a run uses and the line that says why (None unless ``template`` is ``auto``).

    ``tokenizers`` maps a role (``student``, ``teacher``) to its tokenizer; a role whose tokenizer is not known here
    (None: a served teacher, which must share the student's tokenizer anyway) is left out. ``auto`` gives ``chat``
    when every known tokenizer has a chat template, else ``alpaca``. An explicit ``chat`` with a tokenizer that has
    none is refused naming the role; ``override`` is how the caller's user sets the template (``template=`` in a
    recipe, ``--template `` on a command line)."""
    if template not in TEMPLATE_CHOICES:
        raise ConfigError(f"template: must be one of {', '.join(TEMPLATE_CHOICES)}, got {template!r}")
    known = {role: tok for role, tok in tokenizers.items() if tok is not None}
    missing = [role for role, tok in known.items() if not has_chat_template(tok)]
    if template == "chat" and missing:
        raise ConfigError(f"template: chat needs a chat template, and the {missing[0]}'s tokenizer has none; "
                          f"use {override}alpaca")
    if template != AUTO:
        return template, None
    if not known:
        raise ConfigError("template: auto needs a tokenizer to look at")
    if not missing:
        who = "both tokenizers have" if len(known) == 2 else f"the {next(iter(known))}'s tokenizer has"
        return "chat", f"template: chat ({who} a chat template; {override}alpaca to override)"
    if len(missing) == len(known) and len(known) == 2:
        why = "neither tokenizer has a chat template"
    else:
        why = f"the {missing[0]}'s tokenizer has no chat template"
    return "alpaca", f"template: alpaca ({why})"


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
