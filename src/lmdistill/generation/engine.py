"""``generate``: validate inputs, pad the prompts, run a policy, assemble the output."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from lmdistill.errors import ConfigError
from lmdistill.generation.batch import Batch
from lmdistill.generation.config import SamplingConfig
from lmdistill.generation.noise import NoiseSource, keys_from_seed
from lmdistill.generation.output import GenerationOutput, assemble
from lmdistill.generation.policies import POLICIES
from lmdistill.losses.vocab import shared_vocab


def _vocab_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


@contextmanager
def _eval_mode(*models):
    """Put models in eval mode (no dropout) for generation; restore their mode afterwards."""
    was = [(m, m.training) for m in models if m is not None]
    for m, _ in was:
        m.eval()
    try:
        yield
    finally:
        for m, training in was:
            m.train(training)


def _check_ids(name: str, rows, allow_none: bool = False, allow_empty: bool = False) -> None:
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ConfigError(f"{name} must be a non-empty list of token-id lists")
    for i, r in enumerate(rows):
        if r is None and allow_none:
            continue
        if not isinstance(r, (list, tuple)) or not all(isinstance(x, int) and x >= 0 for x in r):
            raise ConfigError(f"{name}[{i}] must be a list of non-negative token ids")
        if not r and not allow_empty:
            raise ConfigError(f"{name}[{i}] is empty")


def pad_left(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def generate(student, prompts: list[list[int]], policy: str = "student", teacher=None,
             gold: list[list[int] | None] | None = None, config: SamplingConfig | None = None, *,
             params=None, scorer=None, pad_id: int | None = None, eos_id: int | None = None,
             row_keys: list[int] | None = None) -> GenerationOutput:
    """Generate one response per prompt with ``policy`` (``student``, ``teacher``, ``mixed``, ``switch``, ``scrg``,
    ``teacher_mix``).

    Args:
        student, teacher: causal LMs (HF ``*ForCausalLM``) sharing a tokenizer; vocabularies may differ
            by padding rows (tokens are drawn among the shared prefix). ``teacher`` is a model in this process.
        prompts: unpadded prompt ids, one list per row.
        gold: gold responses (``mixed``); a ``None`` entry falls back to the teacher's sample.
        config: ``SamplingConfig`` (how tokens are drawn); ``config.seed`` makes the run repeat exactly.
        params: the policy's parameters (its ``Params`` dataclass, or a mapping of its fields; default: its
            defaults), e.g. ``{"tau0": 0.5}`` for ``switch``.
        scorer: a teacher that scores whole sequences (``sequence_scores``: a served teacher) instead of a
            ``teacher`` model, for the policies that can use one (``scrg``).
        pad_id: id written after a row's end (default ``eos_id``); ``eos_id``: a row stops after it
            (``None``: rows always run ``max_new_tokens``).
        row_keys: one 32-bit noise key per row instead of keys drawn from ``config.seed`` (the CLI uses
            ``key_from(seed, example_id)`` so an example's response does not depend on its batch).
    """
    config = config or SamplingConfig()
    if not isinstance(config, SamplingConfig):
        raise ConfigError(f"config must be a SamplingConfig, got {type(config).__name__}")
    if policy not in POLICIES:
        raise ConfigError(f"unknown generation policy {policy!r}; choose one of {', '.join(POLICIES)}")
    spec = POLICIES[policy]
    params = spec.params(params, where=f"policy ({policy})")
    _check_ids("prompts", prompts)
    if gold is not None:
        _check_ids("gold", gold, allow_none=True)
        if len(gold) != len(prompts):
            raise ConfigError(f"gold has {len(gold)} rows but prompts has {len(prompts)}")
    needs = spec.teacher_needs(params, all_gold=gold is not None and all(g is not None for g in gold))
    have = {"steps"} if teacher is not None else {"sequence_scores"} if scorer is not None else set()
    if needs and not have & set(needs):
        what = "a teacher model" if needs == ("steps",) else "a teacher model or a sequence scorer"
        raise ConfigError(f"policy {policy!r} needs {what}" + (
            " (every generated step asks the teacher's distribution; a served teacher only scores whole sequences)"
            if scorer is not None else ""))
    if pad_id is None:
        pad_id = eos_id
    if pad_id is None:
        raise ConfigError("generate needs pad_id or eos_id")
    if row_keys is not None and len(row_keys) != len(prompts):
        raise ConfigError(f"row_keys has {len(row_keys)} entries but prompts has {len(prompts)}")

    vocab = _vocab_rows(student)
    if teacher is not None:
        vocab = shared_vocab(vocab, _vocab_rows(teacher))
    if config.vocab_size is not None:
        if config.vocab_size > vocab:
            raise ConfigError(f"vocab_size={config.vocab_size} exceeds the models' {vocab} vocabulary rows")
        vocab = config.vocab_size
    device = next(student.parameters()).device
    keys = row_keys if row_keys is not None else keys_from_seed(len(prompts), config.seed)
    ids, mask = pad_left([list(p) for p in prompts], pad_id)
    batch = Batch(ids.to(device), mask.to(device), config, pad_id, eos_id, vocab, NoiseSource(keys, vocab, device),
                  device, [list(g) if g is not None else None for g in gold] if gold is not None else None,
                  params=params, scorer=scorer)
    with torch.no_grad(), _eval_mode(student, teacher):
        decoded = spec.run(student, teacher, batch)
    return assemble(batch, decoded, policy)
