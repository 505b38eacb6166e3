"""Every setting of ``lmdistill train`` (:class:`TrainConfig`) and the checks that refuse a config which cannot run,
naming its key, before any model loads: ranges of numbers, the policy and its parameters, the objective's terms,
sampling, and what the run asks of its teacher against what the teacher kind gives (``needs.py``). Recipes and
overrides are read into it by ``recipes.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field

from lmdistill.data.templates import TEMPLATE_CHOICES
from lmdistill.errors import ConfigError
from lmdistill.generation import SamplingConfig
from lmdistill.generation.config import MOVED_TO_POLICY
from lmdistill.losses.objective import TERMS, check_objective, entry_name, term_class
from lmdistill.teachers import SERVED, check_spec, teacher_kind
from lmdistill.teachers.cross_tokenizer import check_cross_options
from lmdistill.train.needs import check_fields, run_needs
from lmdistill.train.recipe_compat import moved_key_error
from lmdistill.train.sources import check_policy, policy_class, policy_params
from lmdistill.train.teacher_set import check_teacher_set, options_spec, teacher_specs

#: Sampling keys the trainer sets itself (per step and micro-batch).
SAMPLING_SET_BY_TRAINER = ("seed",)


@dataclass
class TrainConfig:
    """Every setting of ``lmdistill train``. Recipes in ``lmdistill/recipes/`` set the method's defaults."""

    # models and data
    student: str = ""
    teacher: str = ""
    # several teachers (teacher_set.py; not with teacher:): {NAME: SPEC}, each SPEC any teacher: value; each row is
    # read by the teacher it names (teacher_route: field, its "teacher" field) or by its data source's namesake
    # (teacher_route: source, with data: {NAME: PATH}); teacher_mix {NAME: weight}: every row reads the mixture
    teachers: dict = field(default_factory=dict)
    teacher_route: str = "field"
    teacher_mix: dict = field(default_factory=dict)
    data: str = "dolly:train"               # or {NAME: PATH}: several sources, in order
    valid_data: str = "dolly:valid"
    output_dir: str = "runs/train"
    template: str = "auto"                  # auto: chat when both tokenizers have a chat template, else alpaca
    max_prompt_length: int = 256
    max_length: int = 512
    max_train_examples: int = 0            # 0 = all
    # method
    method: str = ""                        # informational name (sft, kd, gkd, ...)
    paper: str = ""
    # where the distilled sequences come from: {name: NAME, ...the policy's parameters} (train/sources.py)
    policy: dict = field(default_factory=lambda: {"name": "gold"})
    objective: list = field(default_factory=lambda: [{"term": "sft", "weight": 1.0}])   # weighted terms
    sampling: dict = field(default_factory=dict)   # SamplingConfig fields (generation/config.py)
    chunked_loss: bool = False              # token-chunked fused LM-head + loss: for 100k+ vocabularies
    # optimisation
    lr: float = 5e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_steps: int = 100
    batch_size: int = 8                     # global batch (sequences per optimiser step)
    micro_batch_size: int = 8               # per process per forward
    # data: micro-batches cut from the step's rows in data order; length: from the rows sorted by length, so each
    # right-padded micro-batch pads less (the same objective: every term is weighted by its global token count)
    micro_batch_order: str = "data"
    clip_grad: float = 1.0
    lr_schedule: str = "cosine"
    mixed_precision: str = "auto"           # auto | no | bf16
    # LoRA
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # every dropout of the student off, in training forwards too (TRL GKDConfig.disable_dropout; setup.py)
    disable_dropout: bool = False
    # bookkeeping
    seed: int = 42
    save_steps: int = 50
    keep_checkpoints: int = 2               # 0 = keep every checkpoint
    checkpoint_format: str = "full"         # full (any process count resumes) | sharded (FSDP2: each rank its shards)
    eval_steps: int = 50
    eval_limit: int = 32                    # validation examples for ROUGE-L
    eval_max_new_tokens: int = 256         # validation ROUGE-L (best/) at the protocol's generation length
    # validation after the last step: auto = when eval_steps fired during the run (best/ then covers the final
    # weights); always; never. Validation samples eval_limit answers of at most eval_max_new_tokens tokens each.
    final_validation: str = "auto"
    log_steps: int = 1
    max_bad_steps: int = 10
    teacher_dtype: str = "float32"
    teacher_top_k: int = 20                 # served teacher (openai:NAME@URL): log-probabilities per position
    teacher_logprobs_api: str = "echo"      # served teacher: echo (completions echo + logprobs) | prompt_logprobs (vLLM)
    # a teacher with another tokenizer (teacher=xtok:SOURCE, teachers/cross_tokenizer.py): the template its prompts
    # use (auto: its own chat template when its tokenizer has one, else alpaca) and, for a served one
    # (xtok:openai:NAME@URL), its tokenizer (a folder or hub id)
    teacher_template: str = "auto"
    teacher_tokenizer: str = ""
    student_dtype: str = "float32"
    device: str = "auto"
    progress: bool = True

    def sampling_config(self, seed: int) -> SamplingConfig:
        """The policy's sampling settings for one step's seed."""
        return SamplingConfig(**{**self.sampling, "seed": seed})

    @property
    def needs_teacher(self) -> bool:
        return bool(run_needs(self))

    def check(self, require_models: bool = True) -> "TrainConfig":
        """Refuse any setting that cannot run, naming its key. ``require_models=False`` (``--print-config``) lets
        the student and the teacher be missing; everything else is checked the same."""
        if not self.student and require_models:
            raise ConfigError("student: is required (a model folder or hub id)")
        if self.template not in TEMPLATE_CHOICES:
            raise ConfigError(f"template: must be one of {', '.join(TEMPLATE_CHOICES)}, got {self.template!r}")
        self.policy = check_policy(self.policy)
        self.objective = check_objective(self.objective)
        self.sampling = check_sampling(self.sampling)
        needs = run_needs(self)
        if needs and not (self.teacher or self.teachers) and require_models:
            raise ConfigError(f"teacher: is required ({'; '.join(n.who for n in needs)} read the teacher)")
        if self.teacher:
            check_spec(self.teacher, needs)
        check_teacher_set(self, needs)   # teachers:, teacher_route, teacher_mix, data: {NAME: PATH}
        check_served(self)
        check_cross_options(self.teacher or options_spec(self), teacher_tokenizer=self.teacher_tokenizer,
                            teacher_template=self.teacher_template)
        check_fields(self)
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                              f"({self.micro_batch_size})")
        if self.micro_batch_order not in ("data", "length"):
            raise ConfigError("micro_batch_order: must be data or length")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ConfigError("lr_schedule: must be one of cosine, linear, constant")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise ConfigError("mixed_precision: must be one of auto, no, bf16")
        if self.final_validation not in ("auto", "always", "never"):
            raise ConfigError(f"final_validation: must be auto, always or never, got {self.final_validation!r}")
        if self.checkpoint_format not in ("full", "sharded"):
            raise ConfigError("checkpoint_format: must be full or sharded")
        if self.chunked_loss:
            slow = [entry_name(e) for e in self.objective if e["weight"] > 0 and not term_class(e).chunkable]
            if slow:
                ok = ", ".join(n for n, c in TERMS.items() if c.chunkable)
                raise ConfigError(f"chunked_loss: term(s) {', '.join(slow)} have no chunked form; chunkable: {ok}")
        for k in ("max_steps", "batch_size", "micro_batch_size", "save_steps", "eval_steps"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{k}: must be > 0, got {getattr(self, k)}")
        source = policy_class(self.policy)
        if source.needs_initial_validation and not self.valid_data:
            raise ConfigError(f"valid_data: policy {self.policy['name']} (DistiLLM's replay) raises its threshold from "
                              "the validation loss; name a validation set (or use policy=student for plain on-policy "
                              "sampling)")
        if getattr(policy_params(self.policy), "capacity", self.micro_batch_size) < self.micro_batch_size:
            raise ConfigError(f"policy.capacity: must hold at least one micro-batch ({self.micro_batch_size}), "
                              f"got {self.policy['capacity']}")
        check_ranges(self)
        return self


#: Every number of ``TrainConfig`` and its range, checked at load (``key: must be ..., got VALUE``); non-finite
#: values fail every range. ``(low, high, high_open)``; None is unbounded. Term parameters and sampling settings
#: are checked by their own classes (``check_objective``, ``SamplingConfig``).
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "lr": (0, None, False), "weight_decay": (0, None, False), "clip_grad": (0, None, False),
    "warmup_ratio": (0, 1, False), "lora_dropout": (0, 1, True),
    "max_prompt_length": (1, None, False), "max_length": (2, None, False), "max_train_examples": (0, None, False),
    "warmup_steps": (0, None, False), "lora_r": (1, None, False), "lora_alpha": (1, None, False),
    "keep_checkpoints": (0, None, False), "eval_limit": (0, None, False), "eval_max_new_tokens": (1, None, False),
    "log_steps": (1, None, False), "max_bad_steps": (1, None, False),
}


def check_ranges(cfg: TrainConfig) -> None:
    for k, (low, high, high_open) in RANGES.items():
        v = getattr(cfg, k)
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and (low is None or v >= low) and (high is None or (v < high if high_open else v <= high)))
        if not ok:
            kind = "a finite number" if typing.get_type_hints(TrainConfig)[k] is float else "an integer"
            if high is None:
                want = f"{kind} >= {low}"
            else:
                want = f"{kind} in [{low}, {high}{')' if high_open else ']'}"
            raise ConfigError(f"{k}: must be {want}, got {v!r}")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(f"max_prompt_length ({cfg.max_prompt_length}) must be < max_length ({cfg.max_length}): "
                          "no room would be left for the response")


def check_served(cfg: TrainConfig) -> None:
    """A served teacher's own settings: ``teacher_top_k`` and ``teacher_logprobs_api``."""
    if SERVED not in {teacher_kind(spec) for spec in teacher_specs(cfg).values()}:
        return
    if isinstance(cfg.teacher_top_k, bool) or not isinstance(cfg.teacher_top_k, int) or cfg.teacher_top_k < 1:
        raise ConfigError(f"teacher_top_k: must be a positive integer, got {cfg.teacher_top_k!r}")
    if cfg.teacher_logprobs_api not in ("echo", "prompt_logprobs"):
        raise ConfigError(f"teacher_logprobs_api: must be echo or prompt_logprobs, got {cfg.teacher_logprobs_api!r}")


def samples_teacher(cfg: TrainConfig) -> bool:
    """Whether the run's policy asks the teacher for next-token steps (so under FSDP2 it is gathered to decode)."""
    return "steps" in policy_class(cfg.policy).teacher_needs(policy_params(cfg.policy))


def check_sampling(values: dict) -> dict:
    """The full sampling settings (every ``SamplingConfig`` field but the seed), validated."""
    if not isinstance(values, dict):
        raise ConfigError(f"sampling: must be a mapping of SamplingConfig fields, got {values!r}")
    fields = [f.name for f in dataclasses.fields(SamplingConfig) if f.name not in SAMPLING_SET_BY_TRAINER]
    for k in values:
        if k in MOVED_TO_POLICY:
            raise moved_key_error(f"sampling.{k}", values[k])
        if k in SAMPLING_SET_BY_TRAINER:
            raise ConfigError(f"sampling.{k}: is set by the trainer from `seed` (per step); set seed= instead")
        if k not in fields:
            close = difflib.get_close_matches(k, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"sampling: unknown key {k!r}{hint} Valid: {', '.join(fields)}")
    hints = typing.get_type_hints(SamplingConfig)
    values = dict(values)
    for k, v in values.items():   # "inf", "0.3" from the command line
        if isinstance(v, str) and hints[k] in (float, int):
            try:
                values[k] = hints[k](v)
            except ValueError:
                pass
    try:
        full = SamplingConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"sampling: {str(e).removeprefix('SamplingConfig: ')}") from None
    return {k: getattr(full, k) for k in fields}
