"""The models under evaluation: parsing ``MODEL`` arguments and producing predictions.

A ``MODEL`` is a local folder, a hub id, a LoRA adapter folder (merged on load) or an
OpenAI-compatible endpoint ``openai:MODEL_NAME@BASE_URL``; ``name=MODEL`` sets the display name.

Local models get the Alpaca prompt text of the protocol and the prompt-length rule (``prompt_overflow``):
prompts over ``max_prompt_length`` tokens of the model's own tokenizer are cut to their first
``max_prompt_length`` tokens (``truncate``, the protocol: MiniLLM's ``PromptDataset.__getitem__`` takes
``data[:prompt_length]``, LMOps ``minillm/data_utils/prompt_datasets.py:104-106``, the same lines in distillm
``data_utils/prompt_datasets.py``) or dropped (``drop``); either way the report names them. API models are prompted
through their server's chat template instead: the instruction (plus input) is sent as one user
message, and no token filter is applied (their tokenizer is unknown here), so their numbers are
not strictly comparable with the papers.

Determinism. Every generated row gets its own sampling-noise key, ``key_from(seed, example_id)``
(``key_from(seed, example_id, j)`` for the j-th extra sample), passed to the sequence engine as
``row_keys``. The engine's noise is a pure function of that key, the step and the token, so a
prediction depends only on the model, the seed and the example: not on the batch size, the
batch's other rows, ``--limit``, or which models and benchmarks run beside it. Left padding inside
a batch can change floating-point rounding of the logits, so on rare near-ties an example could
still sample differently under another batch layout. API requests send ``derive_seed(seed,
example_id, j)`` as the request seed (honoured when the server supports seeds).

Decoding. Local models sample with ``lmdistill.generation`` (the row-keyed noise above), not with the decoding
service of ``lmdistill serve`` (``lmdistill.decoding``: per-request generators, a continuous batch), so the
protocol's results stay bit-identical whatever runs beside them. API models, an ``lmdistill serve`` of a local
model included, are asked through ``lmdistill.clients``, as quantification asks them.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from lmdistill.data import Example, FilterReport, tokenize_examples
from lmdistill.data.templates import chat_messages
from lmdistill.errors import ConfigError
from lmdistill.generation import SamplingConfig, generate, key_from
from lmdistill.models import load_model, load_tokenizer
from lmdistill.models.load import resolve_device
from lmdistill.clients import make_client

API_PREFIX = "openai:"
PROMPT_OVERFLOW = ("truncate", "drop")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def derive_seed(seed: int, *keys: str) -> int:
    """A stable 63-bit seed from ``seed`` and string keys (the same on every machine and run)."""
    text = "\x1f".join([str(seed), *keys])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def sample_key(seed: int, example_id: str, sample: int = 0) -> int:
    """The engine's 64-bit noise key of one generated row (sample 0 keeps the plain key)."""
    return key_from(seed, example_id) if sample == 0 else key_from(seed, example_id, sample)


def safe_name(name: str) -> str:
    """A display name made safe as one folder name."""
    out = re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("._")
    return out or "model"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str

    @property
    def is_api(self) -> bool:
        return self.source.startswith(API_PREFIX)

    @property
    def dirname(self) -> str:
        return safe_name(self.name)


def parse_model_spec(text: str) -> ModelSpec:
    """``[name=]source``; the default name is the folder's base name, the hub id or the API model name."""
    text = text.strip()
    if not text:
        raise ConfigError("empty MODEL argument")
    name = None
    if "=" in text and not Path(text).exists():
        left, right = text.split("=", 1)
        if _NAME_RE.match(left) and right:
            name, text = left, right
    if text.startswith(API_PREFIX):
        api_name, sep, base_url = text[len(API_PREFIX):].rpartition("@")
        if not sep or not api_name or not base_url:
            raise ConfigError(f"{text}: an API model is written openai:MODEL_NAME@BASE_URL "
                              "(e.g. openai:gpt-4o-mini@https://api.openai.com/v1)")
        default = api_name
    elif Path(text).exists():
        default = Path(text).resolve().name
    else:
        default = text
    return ModelSpec(name or default, text)


def parse_model_specs(models: Sequence[str | ModelSpec]) -> list[ModelSpec]:
    """Parse ``[name=]source`` strings (``ModelSpec`` pass through); names must be distinct."""
    specs = [m if isinstance(m, ModelSpec) else parse_model_spec(m) for m in models]
    seen: dict[str, str] = {}
    for s in specs:
        if s.dirname in seen:
            raise ConfigError(f"two models share the name {s.name!r} ({seen[s.dirname]} and {s.source}); "
                              "name them with NAME=MODEL")
        seen[s.dirname] = s.source
    return specs


@dataclass
class Item:
    """One example ready to generate from."""

    example: Example
    prompt_ids: list[int] | None = None  # local models
    messages: list[dict] | None = None  # API models


@dataclass
class Prediction:
    outputs: list[str]  # num_samples stripped texts
    tokens: list[int] | None = None  # generated tokens per sample (local models)
    stopped: list[bool] | None = None  # whether each sample ended with EOS (local models)


@dataclass
class PromptReport(FilterReport):
    """What the prompt-length rule did: ``removed_ids`` (dropped) and ``truncated_ids`` (cut, still scored)."""

    truncated_ids: list[str] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        return len(self.truncated_ids)

    def __str__(self) -> str:
        return f"{self.name}: kept {self.kept}, removed {self.removed}, truncated {self.truncated} ({self.reason})"


def apply_prompt_overflow(items: list[Item], max_prompt_length: int, overflow: str
                          ) -> tuple[list[Item], PromptReport]:
    """Apply the prompt-length rule to tokenized ``items``: ``truncate`` keeps a longer prompt's first
    ``max_prompt_length`` ids (``ids[:max_prompt_length]``, as MiniLLM's ``prompt_datasets.py:106``), ``drop``
    removes the example; the report lists the ids either way."""
    if overflow not in PROMPT_OVERFLOW:
        raise ConfigError(f"prompt_overflow must be one of {', '.join(PROMPT_OVERFLOW)}, got {overflow!r}")
    long_ids = [it.example.id for it in items if len(it.prompt_ids) > max_prompt_length]
    if overflow == "drop":
        kept = [it for it in items if len(it.prompt_ids) <= max_prompt_length]
        return kept, PromptReport("prompt-length filter", len(kept), long_ids,
                                  f"prompt longer than {max_prompt_length} tokens dropped")
    kept = [replace(it, prompt_ids=it.prompt_ids[:max_prompt_length]) for it in items]
    return kept, PromptReport("prompt-length filter", len(kept), [],
                              f"prompt longer than {max_prompt_length} tokens truncated to its first "
                              f"{max_prompt_length}", truncated_ids=long_ids)


class LocalPredictor:
    """A Hugging Face causal LM (folder, hub id or LoRA adapter) sampled by ``lmdistill.generation``'s sequence
    engine with row-keyed noise (never through ``lmdistill.decoding``'s batcher: see the module docstring)."""

    kind = "local"

    def __init__(self, spec: ModelSpec, *, device: str | None = None, dtype: str = "float32", template: str = "alpaca",
                 model=None, tokenizer=None):
        self.spec, self.device, self.dtype, self.template = spec, resolve_device(device), dtype, template
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(_tokenizer_source(spec.source))
        if template == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"{spec.name}: --template chat needs a tokenizer with a chat template, and "
                              f"{spec.source} has none (use the protocol's alpaca template)")
        self._model = model

    @classmethod
    def from_model(cls, model, tokenizer, *, name: str = "model", template: str = "alpaca") -> "LocalPredictor":
        """A predictor over a model already in memory (validation during training)."""
        return cls(ModelSpec(name, name), device=str(next(model.parameters()).device), template=template,
                   model=model, tokenizer=tokenizer)

    def close(self) -> None:
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self.spec.source, dtype=self.dtype, device=str(self.device))
        return self._model

    def prepare(self, examples: list[Example], max_prompt_length: int, prompt_overflow: str = "truncate"
                ) -> tuple[list[Item], PromptReport]:
        """Tokenize with the template, then apply the prompt-length rule (``apply_prompt_overflow``)."""
        toks, _ = tokenize_examples(examples, self.tokenizer, template=self.template,
                                    max_prompt_length=sys.maxsize, with_response=False)  # nothing filtered here
        return apply_prompt_overflow([Item(t.example, prompt_ids=t.prompt_ids) for t in toks], max_prompt_length,
                                     prompt_overflow)

    def predict(self, batch: list[Item], seed: int, sampling: SamplingConfig, num_samples: int = 1
                ) -> list[Prediction]:
        """``num_samples`` samples per item; each row's noise is keyed by (seed, example id, sample)."""
        k = num_samples
        prompts = [it.prompt_ids for it in batch for _ in range(k)]
        keys = [sample_key(seed, it.example.id, j) for it in batch for j in range(k)]
        tok = self.tokenizer
        out = generate(self.model, prompts, policy="student", config=replace(sampling, seed=seed),
                       pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, row_keys=keys)
        preds = []
        for i in range(len(batch)):
            rows = out.responses[i * k:(i + 1) * k]
            stopped = [bool(r) and r[-1] == tok.eos_token_id for r in rows]
            texts = [tok.decode(r[:-1] if s else r, skip_special_tokens=True).strip() for r, s in zip(rows, stopped)]
            preds.append(Prediction(texts, tokens=[len(r) for r in rows], stopped=stopped))
        return preds


def _tokenizer_source(source: str) -> str:
    """The tokenizer of a LoRA adapter folder without its own tokenizer is the base model's."""
    cfg = Path(source) / "adapter_config.json"
    if cfg.exists() and not (Path(source) / "tokenizer_config.json").exists():
        return json.loads(cfg.read_text())["base_model_name_or_path"]
    return source


class ApiPredictor:
    """An OpenAI-compatible chat endpoint (an API, or ``lmdistill serve`` of a local chat model) through
    ``lmdistill.clients.make_client``.

    API models are prompted through their chat template (the instruction, plus the input, as one
    user message), not the Alpaca text of the protocol, and no prompt-length filter is applied.
    With ``cache_path`` every answered request is appended to a crash-safe response cache, so a
    seed interrupted half-way does not pay again for the requests it already made.
    """

    kind = "api"

    def __init__(self, spec: ModelSpec, *, api_key_env: str | None = None, cache_path: str | Path | None = None):
        self.spec = spec
        kw = {"api_key_env": api_key_env} if api_key_env else {}
        self.client = make_client(spec.source, cache_path=cache_path, **kw)

    def prepare(self, examples: list[Example], max_prompt_length: int, prompt_overflow: str = "truncate"
                ) -> tuple[list[Item], PromptReport]:
        items = [Item(ex, messages=chat_messages(ex)) for ex in examples]
        return items, PromptReport("prompt-length filter", len(items), [], "not applied to API models")

    def predict(self, batch: list[Item], seed: int, sampling: SamplingConfig, num_samples: int = 1
                ) -> list[Prediction]:
        k = num_samples
        temperature = 0.0 if sampling.greedy else sampling.temperature

        def ask(job: tuple[Item, int]) -> str:
            item, j = job
            text = self.client.chat(item.messages, temperature=temperature, max_tokens=sampling.max_new_tokens,
                                    top_p=sampling.top_p, seed=derive_seed(seed, item.example.id, str(j)) % (2 ** 31))
            return (text or "").strip()

        jobs = [(it, j) for it in batch for j in range(k)]
        workers = max(1, min(getattr(self.client, "concurrency", 1), len(jobs)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            texts = list(pool.map(ask, jobs))
        return [Prediction(texts[i * k:(i + 1) * k]) for i in range(len(batch))]

    def close(self) -> None:
        self.client.close()


def make_predictor(spec: ModelSpec, *, device: str | None = None, dtype: str = "float32",
                   api_key_env: str | None = None, cache_path: str | Path | None = None, template: str = "alpaca"):
    """The predictor of ``spec``; ``cache_path`` is the response cache of API models, ``template`` the prompt
    template of local ones (API models use their server's chat template)."""
    if spec.is_api:
        return ApiPredictor(spec, api_key_env=api_key_env, cache_path=cache_path)
    return LocalPredictor(spec, device=device, dtype=dtype, template=template)


__all__ = ["ApiPredictor", "Item", "LocalPredictor", "ModelSpec", "PROMPT_OVERFLOW", "Prediction", "PromptReport",
           "apply_prompt_overflow",
           "derive_seed", "make_predictor", "sample_key", "parse_model_spec", "parse_model_specs", "safe_name"]
