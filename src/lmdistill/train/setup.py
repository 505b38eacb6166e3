"""The pieces a training run is built from: accelerator, data rows, models, optimiser and schedule.

Each builder takes the recipe (``TrainConfig``) and returns one piece; ``trainer.Run`` calls them in a fixed order
(the order fixes the random state every later piece sees, so runs restore and reproduce exactly).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from accelerate import Accelerator

from lmdistill.data import load_examples, tokenize_examples
from lmdistill.data.templates import AUTO, resolve_template
from lmdistill.errors import ConfigError
from lmdistill.losses.objective import TERMS
from lmdistill.models import load_model, load_tokenizer
from lmdistill.runtime import rank_world
from lmdistill.teachers import CACHE, LOCAL, cache_dir, examples_hash, open_teacher, teacher_kind, tokenizer_hash
from lmdistill.teachers.cache import read_manifest
from lmdistill.train.config import TrainConfig
from lmdistill.train.needs import run_needs
from lmdistill.train.teacher_set import check_routes, load_train_examples, open_teacher_set, set_template


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    use_bf16 = cfg.mixed_precision == "bf16" or (
        cfg.mixed_precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    # without CUDA, `accelerate launch --multi_gpu --num_processes N` runs N CPU processes over gloo
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    acc = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=cpu)
    if cfg.batch_size % acc.num_processes:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must split evenly over {acc.num_processes} processes")
    return acc


def check_tokenizers(student_tok, teacher_tok) -> None:
    """Refuse tokenizers that disagree on more than padding: the shared id range must map to the same tokens."""
    sv = {i: t for t, i in student_tok.get_vocab().items()}
    tv = {i: t for t, i in teacher_tok.get_vocab().items()}
    for i in range(min(len(sv), len(tv))):
        if sv.get(i) != tv.get(i):
            raise ConfigError(f"teacher and student tokenizers differ at id {i}: student {sv.get(i)!r}, "
                              f"teacher {tv.get(i)!r}; distillation needs a shared tokenizer{cross_tokenizer_hint()}")
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(student_tok, name) != getattr(teacher_tok, name):
            raise ConfigError(f"teacher and student tokenizers have different {name}{cross_tokenizer_hint()}")


def cross_tokenizer_hint() -> str:
    """How to train with a teacher of another tokenizer: the ``xtok:`` kind and the terms that read it."""
    terms = [name for name, cls in TERMS.items() if "aligned" in cls.teacher_needs({})[0]]
    return (f" (or name it teacher=xtok:PATH, a teacher with its own tokenizer, and train with a term that aligns "
            f"the two by bytes: {', '.join(terms)}; recipes of the same names)")


def load_tokenizers(cfg: TrainConfig):
    """The student's tokenizer, checked against a local teacher's; resolves ``cfg.template`` in place (``auto``
    becomes ``alpaca`` or ``chat``, ``resolve_template``) so that the rows, the cache check, validation and the
    run's ``config.json`` all see the template the run uses."""
    tokenizer = load_tokenizer(cfg.student)
    teacher_tokenizer = None
    if cfg.teacher and teacher_kind(cfg.teacher) == LOCAL:
        teacher_tokenizer = load_tokenizer(cfg.teacher)
        check_tokenizers(tokenizer, teacher_tokenizer)
    for name, spec in cfg.teachers.items():   # several teachers: each local one shares the student's tokenizer
        if teacher_kind(spec) == LOCAL:
            try:
                check_tokenizers(tokenizer, load_tokenizer(spec))
            except ConfigError as e:
                raise ConfigError(f"teachers.{name}: {e}") from None
    cfg.template = run_template(cfg, tokenizer, teacher_tokenizer)
    return tokenizer


def resolve_config_template(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``template: auto`` resolved in place from the models' tokenizers (``run_template``), for callers
    that need the template a run will use before the run builds its pieces (its identity, ``train/ownership.py``).
    A resolved template stays as it is; the run's ``load_tokenizers`` then only checks it again."""
    if cfg.template == AUTO and cfg.student:
        cfg.template = run_template(cfg, load_tokenizer(cfg.student))
    return cfg


def run_template(cfg: TrainConfig, tokenizer, teacher_tokenizer=None) -> str:
    """``cfg.template`` resolved; ``auto`` is said once (by the main process). A local teacher's tokenizer is loaded
    unless given. A cached teacher's ``auto`` is the template its capture recorded (the cache's rows were built with
    it); a served teacher's tokenizer is not known here (it must equal the student's), so the student's decides.
    Several teachers (``teachers:``): ``teacher_set.set_template``."""
    if cfg.teachers:
        template, note = set_template(cfg, tokenizer)
        if note:
            _say(note)
        return template
    kind = teacher_kind(cfg.teacher) if cfg.teacher else None
    if kind == LOCAL and teacher_tokenizer is None and cfg.template != "alpaca":
        teacher_tokenizer = load_tokenizer(cfg.teacher)
    if cfg.template == AUTO and kind == CACHE:
        manifest = read_manifest(Path(cache_dir(cfg.teacher))) if Path(cache_dir(cfg.teacher)).is_dir() else None
        if manifest and manifest.get("template") in ("alpaca", "chat"):
            _say(f"template: {manifest['template']} (the template cache:{cache_dir(cfg.teacher)} was captured with)")
            return manifest["template"]
    roles = {"student": tokenizer}
    if kind == LOCAL:
        roles["teacher"] = teacher_tokenizer
    template, note = resolve_template(cfg.template, roles)
    if note:
        _say(note)
    return template


def _say(line: str) -> None:
    if rank_world()[0] == 0:   # no PartialState() here: it would start the process group before the run does
        print(f"[lmdistill] {line}", flush=True)


#: Tokenized training sets of this process, by content (examples, tokenizer, template, lengths): the demo's ten
#: student runs share one tokenization of Dolly train instead of redoing it (a few seconds each).
_ROWS_MEMO: dict[tuple, tuple[list, list[str]]] = {}
_ROWS_MEMO_SIZE = 4


def _tokenizer_key(tokenizer) -> str:
    """What decides a tokenizer's ids: its whole serialised pipeline where it has one (fast tokenizers: vocabulary,
    merges, normaliser), plus the vocabulary, special ids and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    full = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest() if backend is not None else ""
    return full + tokenizer_hash(tokenizer)


def _tokenized_rows(examples, tokenizer, cfg: TrainConfig) -> tuple[list, list[str]]:
    key = (examples_hash(examples), _tokenizer_key(tokenizer), cfg.template, cfg.max_prompt_length, cfg.max_length,
           tuple(ex.teacher for ex in examples))   # the rows keep their examples: their teachers too
    if key not in _ROWS_MEMO:
        rows, reports = tokenize_examples(examples, tokenizer, template=cfg.template,
                                          max_prompt_length=cfg.max_prompt_length, max_length=cfg.max_length)
        while len(_ROWS_MEMO) >= _ROWS_MEMO_SIZE:
            _ROWS_MEMO.pop(next(iter(_ROWS_MEMO)))
        _ROWS_MEMO[key] = (rows, [str(r) for r in reports])
    rows, reports = _ROWS_MEMO[key]
    return list(rows), list(reports)   # rows are never modified in place; the lists are the caller's


def load_rows(cfg: TrainConfig, tokenizer) -> tuple[list, list, list[str]]:
    """Tokenized training rows, validation rows (the first ``eval_limit``) and the filters' reports; a template
    still ``auto`` is resolved first (``run_template``)."""
    if cfg.template == AUTO:
        cfg.template = run_template(cfg, tokenizer)
    examples = load_train_examples(cfg)[: cfg.max_train_examples or None]
    check_routes(cfg, examples)   # several teachers: every row names one of them, before any model loads
    rows, reports = _tokenized_rows(examples, tokenizer, cfg)
    if not rows:
        raise ConfigError(f"data: no training rows left after filtering ({'; '.join(reports)})")
    valid_rows = []
    if cfg.valid_data:
        valid = load_examples(cfg.valid_data)
        valid_rows, _ = tokenize_examples(valid.examples[: max(cfg.eval_limit, 1)], tokenizer, template=cfg.template,
                                          max_prompt_length=cfg.max_prompt_length, max_length=cfg.max_length)
    return rows, valid_rows, reports


def load_student(cfg: TrainConfig, device):
    student = load_model(cfg.student, dtype=cfg.student_dtype, device=str(device), trainable=True)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                     lora_dropout=cfg.lora_dropout,
                                                     target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM"))
    if cfg.disable_dropout:
        disable_dropout(student)
    student.train()
    return student


#: Float attributes through which HF attention modules pass their dropout to the attention kernel in train mode
#: (``dropout=0.0 if not self.training else self.attention_dropout``): not ``nn.Dropout`` modules.
DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "attn_drop", "dropout", "dropout_p", "dropout_prob")


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout of ``model`` off, for good (train-mode forwards too): ``p = 0`` on each ``nn.Dropout`` (TRL's
    ``disable_dropout_in_model``, trl/trainer/utils.py:182, applied to the whole model, LoRA's dropout included, by
    ``GKDTrainer.__init__``, gkd_trainer.py:202-204), and 0 for the float dropout rates that attention modules and
    the config hold (Llama's ``attention_dropout``, which TRL's loop does not reach; the exported folders' configs
    then say 0 as well)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in DROPOUT_ATTRS:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for key, value in config.to_dict().items():
                if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                    setattr(config, key, 0.0)


def load_teacher(cfg: TrainConfig, device, tokenizer=None):
    """The run's :class:`~lmdistill.teachers.base.Teacher` (a model in this process, ``cache:DIR`` or
    ``openai:NAME@URL``; ``None`` without one), checked against what the run asks of it (``needs.run_needs``: a
    cache knows its temperature only now)."""
    if cfg.teachers:   # several: each opened as the run's one teacher would be (teacher_set.py)
        return open_teacher_set(cfg, lambda member: load_teacher(member, device, tokenizer), run_needs(cfg))
    if not cfg.teacher:
        return None

    def cache_expects(manifest: dict) -> dict:   # the cache's rows must be this run's
        data = load_train_examples(cfg)[: manifest.get("limit") or None]
        return {"tokenizer_hash": tokenizer_hash(tokenizer), "template": cfg.template,
                "max_prompt_length": cfg.max_prompt_length, "max_length": cfg.max_length,
                "data_hash": examples_hash(data)}

    return open_teacher(cfg.teacher, run_needs(cfg), device=device, dtype=cfg.teacher_dtype, tokenizer=tokenizer,
                        expect=cache_expects, top_k=cfg.teacher_top_k, api=cfg.teacher_logprobs_api,
                        cache_path=Path(cfg.output_dir) / "teacher_scores.jsonl",
                        teacher_tokenizer=cfg.teacher_tokenizer, teacher_template=cfg.teacher_template)


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def make_scheduler(cfg: TrainConfig, optimizer):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * cfg.max_steps)
    # transformers' "constant" ignores warm-up; a constant schedule with warm-up steps warms up first (LMOps' constant_trm)
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" and warmup else cfg.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=cfg.max_steps)
