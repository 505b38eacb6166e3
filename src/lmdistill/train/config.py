"""Recipe configuration: a YAML delta over ``recipes/base.yaml`` plus ``key=value`` overrides, checked before any
model loads.

Resolution order: ``TrainConfig`` defaults, then the recipe's base (``base.yaml`` unless the recipe names another
with ``base: NAME`` or ``base: none``), then the recipe, then the overrides. ``sampling`` merges key by key (it is
the generation package's ``SamplingConfig``); ``objective`` is replaced as a whole, or edited entry by entry with
``objective.NAME.KEY=VALUE`` (a NAME not in the list adds that term with weight 1).

An unknown key names the closest valid key; a wrong type names the key and the type it needs; a key of the old
flat format (``loss``, ``kd_weight``, ``tau0``, ...) names its replacement.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmdistill.data.templates import TEMPLATE_CHOICES
from lmdistill.errors import ConfigError
from lmdistill.generation import POLICIES as GENERATION_POLICIES
from lmdistill.generation import NEEDS_TEACHER, SCORES_SEQUENCES, SamplingConfig
from lmdistill.generation.policies.mixed import needs_teacher as mixed_needs_teacher
from lmdistill.losses.objective import TERMS, check_objective, entry_name, entry_params, reads_teacher, term_class
from lmdistill.teachers.spec import CACHE, LOCAL, SERVED, teacher_kind
from lmdistill.train.sources import SOURCES, source_class

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
BASE_RECIPE = "base"
POLICIES = (*SOURCES, *GENERATION_POLICIES)   # sequence sources of their own, then the engine's policies
#: Sampling keys the trainer sets itself (per step and micro-batch).
SAMPLING_SET_BY_TRAINER = ("seed",)


@dataclass
class TrainConfig:
    """Every setting of ``lmdistill train``. Recipes in ``lmdistill/recipes/`` set the method's defaults."""

    # models and data
    student: str = ""
    teacher: str = ""
    data: str = "dolly:train"
    valid_data: str = "dolly:valid"
    output_dir: str = "runs/train"
    template: str = "auto"                  # auto: chat when both tokenizers have a chat template, else alpaca
    max_prompt_length: int = 256
    max_length: int = 512
    max_train_examples: int = 0            # 0 = all
    # method
    method: str = ""                        # informational name (sft, kd, gkd, ...)
    paper: str = ""
    policy: str = "gold"                    # where the distilled sequences come from
    objective: list = field(default_factory=lambda: [{"term": "sft", "weight": 1.0}])   # weighted terms
    sampling: dict = field(default_factory=dict)   # SamplingConfig fields (generation/config.py)
    chunked_loss: bool = False              # token-chunked fused LM-head + loss: for 100k+ vocabularies
    # distillm adaptive off-policy (policy: replay)
    replay_capacity: int = 1000
    replay_policy: str = "student"          # the engine policy that generates the buffer's sequences (MGSR: scrg)
    replay_init_threshold: float = 0.0
    replay_threshold_step: float = 0.1
    replay_loss_eps: float = 0.1
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
    student_dtype: str = "float32"
    device: str = "auto"
    progress: bool = True

    def sampling_config(self, seed: int) -> SamplingConfig:
        """The policy's sampling settings for one step's seed."""
        return SamplingConfig(**{**self.sampling, "seed": seed})

    @property
    def needs_teacher(self) -> bool:
        return samples_teacher(self) or any(reads_teacher(e) for e in self.objective if e["weight"] > 0)

    def check(self, require_models: bool = True) -> "TrainConfig":
        """Refuse any setting that cannot run, naming its key. ``require_models=False`` (``--print-config``) lets
        the student and the teacher be missing; everything else is checked the same."""
        if not self.student and require_models:
            raise ConfigError("student: is required (a model folder or hub id)")
        if self.template not in TEMPLATE_CHOICES:
            raise ConfigError(f"template: must be one of {', '.join(TEMPLATE_CHOICES)}, got {self.template!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy: {self.policy!r} is not one of {', '.join(POLICIES)}")
        self.objective = check_objective(self.objective)
        self.sampling = check_sampling(self.sampling)
        if self.needs_teacher and not self.teacher and require_models:
            terms = ", ".join(entry_name(e) for e in self.objective if reads_teacher(e)) or "none"
            raise ConfigError(f"teacher: is required for policy={self.policy} (terms that read the teacher: {terms})")
        if self.teacher:
            check_teacher_use(self)
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
        if self.policy == "replay":
            if not self.valid_data:
                raise ConfigError("valid_data: policy=replay (DistiLLM) raises its threshold from the validation loss; "
                                  "name a validation set (or use policy=student for plain on-policy sampling)")
            if self.replay_policy not in GENERATION_POLICIES:
                raise ConfigError(f"replay_policy: {self.replay_policy!r} is not one of {', '.join(GENERATION_POLICIES)}")
            if self.replay_capacity < self.micro_batch_size:
                raise ConfigError(f"replay_capacity: must hold at least one micro-batch ({self.micro_batch_size}), "
                                  f"got {self.replay_capacity}")
            for k in ("replay_init_threshold", "replay_threshold_step"):
                if not 0 <= getattr(self, k) <= 1:
                    raise ConfigError(f"{k}: must be in [0, 1], got {getattr(self, k)}")
        check_ranges(self)
        return self


#: Every number of ``TrainConfig`` and its range, checked at load (``key: must be ..., got VALUE``); non-finite
#: values fail every range. ``(low, high, high_open)``; None is unbounded. Term parameters and sampling settings
#: are checked by their own classes (``check_objective``, ``SamplingConfig``).
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "lr": (0, None, False), "weight_decay": (0, None, False), "clip_grad": (0, None, False),
    "warmup_ratio": (0, 1, False), "lora_dropout": (0, 1, True),
    "replay_init_threshold": (0, 1, False), "replay_threshold_step": (0, 1, False), "replay_loss_eps": (0, None, False),
    "max_prompt_length": (1, None, False), "max_length": (2, None, False), "max_train_examples": (0, None, False),
    "warmup_steps": (0, None, False), "lora_r": (1, None, False), "lora_alpha": (1, None, False),
    "keep_checkpoints": (0, None, False), "eval_limit": (0, None, False), "eval_max_new_tokens": (1, None, False),
    "log_steps": (1, None, False), "max_bad_steps": (1, None, False), "replay_capacity": (1, None, False),
}


def check_ranges(cfg: TrainConfig) -> None:
    for k, (low, high, high_open) in RANGES.items():
        v = getattr(cfg, k)
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and (low is None or v >= low) and (high is None or (v < high if high_open else v <= high)))
        if not ok:
            kind = "a finite number" if HINTS[k] is float else "an integer"
            if high is None:
                want = f"{kind} >= {low}"
            else:
                want = f"{kind} in [{low}, {high}{')' if high_open else ']'}"
            raise ConfigError(f"{k}: must be {want}, got {v!r}")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(f"max_prompt_length ({cfg.max_prompt_length}) must be < max_length ({cfg.max_length}): "
                          "no room would be left for the response")


def samples_teacher(cfg: TrainConfig) -> bool:
    """Whether the run's generator asks the teacher for tokens: a policy that always does, or ``mixed`` whose
    off-policy rows are the teacher's samples (``sampling.mixed_off_policy: teacher``, TRL's ``seq_kd``)."""
    generator = source_class(cfg.policy).generator_policy(cfg)
    return generator in NEEDS_TEACHER or (generator == "mixed" and mixed_needs_teacher(cfg.sampling_config(0)))


def check_teacher_use(cfg: TrainConfig) -> None:
    """A cached or served teacher gives top-k scores of whole sequences: refuse what needs more of it."""
    kind = teacher_kind(cfg.teacher)
    if kind == LOCAL:
        return
    where = f"teacher: {cfg.teacher}"
    generator = source_class(cfg.policy).generator_policy(cfg)
    if samples_teacher(cfg) and generator not in SCORES_SEQUENCES:
        what = "mixed with sampling.mixed_off_policy=teacher" if generator == "mixed" else repr(generator)
        raise ConfigError(f"{where}: policy {what} needs the teacher at every generated token, so it needs a "
                          f"local teacher (teacher: PATH); a {'cached' if kind == CACHE else 'served'} teacher only "
                          f"scores whole sequences (policies that can use a served one: {', '.join(SCORES_SEQUENCES)})")
    if kind == CACHE and generator is not None:
        raise ConfigError(f"{where}: a cache holds the teacher's scores of fixed sequences, but policy "
                          f"{cfg.policy!r} samples new ones each step; use a served teacher (openai:NAME@URL) or a "
                          "local one, or generate the sequences first (lmdistill generate) and capture them")
    used = [e for e in cfg.objective if e["weight"] > 0 and reads_teacher(e)]
    dense = [entry_name(e) for e in used if not term_class(e).sparse_teacher]
    if dense:
        ok = ", ".join(n for n, c in TERMS.items() if c.sparse_teacher)
        raise ConfigError(f"{where}: term(s) {', '.join(dense)} need the teacher's full distribution; a "
                          f"{'cached' if kind == CACHE else 'served'} teacher gives its top-k (terms that take it: "
                          f"{ok}); use a local teacher")
    if kind == SERVED:
        if isinstance(cfg.teacher_top_k, bool) or not isinstance(cfg.teacher_top_k, int) or cfg.teacher_top_k < 1:
            raise ConfigError(f"teacher_top_k: must be a positive integer, got {cfg.teacher_top_k!r}")
        if cfg.teacher_logprobs_api not in ("echo", "prompt_logprobs"):
            raise ConfigError(f"teacher_logprobs_api: must be echo or prompt_logprobs, got {cfg.teacher_logprobs_api!r}")
        if generator in SCORES_SEQUENCES and cfg.sampling_config(0).divergence_temperature != 1.0:
            raise ConfigError(f"{where}: SCRG compares the models at the sampling temperature "
                              f"(sampling.temperature={cfg.sampling.get('temperature')}); a served teacher's "
                              "log-probabilities are at temperature 1: sample at 1 (or greedy) or use a local teacher")
        hot = [entry_name(e) for e in used if float(entry_params(e).get("temperature", 1.0)) != 1.0]
        if hot:
            raise ConfigError(f"{where}: term(s) {', '.join(hot)} set a temperature; a served teacher's log-probabilities "
                              "are at temperature 1, so the terms must use temperature 1.0")


def check_sampling(values: dict) -> dict:
    """The full sampling settings (every ``SamplingConfig`` field but the seed), validated."""
    if not isinstance(values, dict):
        raise ConfigError(f"sampling: must be a mapping of SamplingConfig fields, got {values!r}")
    fields = [f.name for f in dataclasses.fields(SamplingConfig) if f.name not in SAMPLING_SET_BY_TRAINER]
    for k in values:
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


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)

# ---------------------------------------------------------------------------------------------- the old format
#: Sampling keys of the old flat format and their names in ``sampling:``.
OLD_SAMPLING = {"max_new_tokens": "max_new_tokens", "gen_temperature": "temperature", "gen_top_k": "top_k",
                "gen_top_p": "top_p", "gen_decoder": "decoder", "mix_lambda": "mixed_student_prob",
                "tau0": "switch_tau0", "lam": "switch_decay", "n_corrections": "scrg_rounds",
                "teacher_mix_alpha": "teacher_mix_alpha"}
OLD_OBJECTIVE = ("loss", "loss_params", "temperature", "sft_weight", "kd_weight", "seq_sft_weight", "span_weight",
                 "span_prior", "dac_kl", "pg_clip", "pg_length_norm")


def translate_old(values: dict) -> dict:
    """The new ``objective`` and ``sampling`` of a recipe written in the old flat format (``loss``, ``kd_weight``,
    ``tau0``, ...), with the old defaults (sft weight 1, no divergence)."""
    out: dict = {}
    t = values.get("temperature", 1.0)
    temp = {"temperature": t} if t != 1.0 else {}
    objective = []
    if values.get("sft_weight", 1.0) > 0:
        objective.append({"term": "sft", "weight": values.get("sft_weight", 1.0)})
    if values.get("seq_sft_weight", 0.0) > 0:
        objective.append({"term": "seq_sft", "weight": values["seq_sft_weight"]})
    loss = values.get("loss", "none")
    if loss != "none" and values.get("kd_weight", 0.0) > 0:
        params = dict(values.get("loss_params") or {})
        if loss == "dac_kl":
            params = dict(values.get("dac_kl") or {})
        if loss == "pg_rkl":
            params = {k2: values[k1] for k1, k2 in (("pg_clip", "clip"), ("pg_length_norm", "length_norm"))
                      if k1 in values}
        objective.append({"term": loss, "weight": values["kd_weight"], **temp, **params})
    if values.get("span_weight", 0.0) > 0:
        prior = {"prior": values["span_prior"]} if "span_prior" in values else {}
        objective.append({"term": "span", "weight": values["span_weight"], **temp, **prior})
    if any(k in values for k in OLD_OBJECTIVE):
        out["objective"] = objective
    sampling = {new: values[old] for old, new in OLD_SAMPLING.items() if old in values}
    if sampling:
        out["sampling"] = sampling
    return out


def _old_format_error(values: dict, where: str) -> ConfigError:
    old = [k for k in values if k in OLD_SAMPLING or k in OLD_OBJECTIVE]
    new = yaml.safe_dump(translate_old(values), sort_keys=False, default_flow_style=None).strip()
    return ConfigError(f"{where}key(s) {', '.join(old)} belong to the old recipe format; a method is now a list of "
                       f"weighted terms and one sampling section. Write instead:\n{new}")


def _old_override_error(key: str, value) -> ConfigError:
    if key in OLD_SAMPLING:
        return ConfigError(f"override: {key!r} is now sampling.{OLD_SAMPLING[key]} (write "
                           f"sampling.{OLD_SAMPLING[key]}={value})")
    return ConfigError(f"override: {key!r} belongs to the old recipe format; edit the objective's terms instead, "
                       f"e.g. objective.sft.weight=0.5, objective.jsd.beta=0.9, objective.span.weight=1 "
                       f"(see --print-config for the recipe's terms)")


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}unknown key {key!r}{hint} Valid keys: {', '.join(sorted(FIELDS))}")


def _coerce(key: str, value, where: str):
    want = HINTS[key]
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif want in (int, float):
        accepted = (int,) if want is int else (int, float)   # an int key never takes 2.5
        if isinstance(value, accepted) and not isinstance(value, bool):
            return want(value)
        if isinstance(value, str):
            try:
                return want(value)
            except ValueError:
                pass
    elif want is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif want is dict:
        if isinstance(value, dict):
            return value
    elif want is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
    hint = " (YAML reads yes/no/on/off as booleans: quote the value)" if want is str and isinstance(value, bool) else ""
    raise ConfigError(f"{where}key {key!r} must be {want.__name__}, got {type(value).__name__} {value!r}{hint}")


def parse_override(text: str) -> tuple[str, object]:
    """``key=value``; the value is parsed as YAML (numbers, booleans, lists, dicts). Dotted keys set entries of
    a mapping (``sampling.top_p=0.9``) or of an objective term (``objective.jsd.beta=0.9``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if HINTS.get(key) is str:   # a text key takes the text as typed: mixed_precision=no is "no", not YAML's False
        return key, raw
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key, value


# ---------------------------------------------------------------------------------------------- recipes
def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem != BASE_RECIPE)


def recipe_path(recipe: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe file, or the built-in recipe of that name."""
    path = Path(recipe)
    if relative_to is not None and not path.is_absolute():
        near = relative_to.parent / path
        if near.is_file():
            return near
    if path.is_file():
        return path
    builtin = RECIPES_DIR / f"{recipe}.yaml"
    if builtin.is_file() and path.suffix != ".yaml":
        return builtin
    raise ConfigError(f"{recipe}: no such recipe file or built-in recipe ({', '.join(builtin_recipes())})")


def read_recipe(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: must be a mapping of key: value")
    return loaded


def merge(values: dict, delta: dict) -> dict:
    """``delta`` over ``values``: mappings merge key by key, everything else is replaced."""
    out = dict(values)
    for k, v in delta.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe_values(recipe: str | Path, relative_to: Path | None = None, seen: tuple = ()) -> dict:
    """The recipe's values over its base chain, type-checked, before overrides."""
    path = recipe_path(recipe, relative_to)
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself")
    loaded = read_recipe(path)
    where = f"{path}: "
    old = [k for k in loaded if k in OLD_SAMPLING or k in OLD_OBJECTIVE]
    if old:
        raise _old_format_error(loaded, where)
    base = loaded.pop("base", None if path.stem == BASE_RECIPE and path.parent == RECIPES_DIR else BASE_RECIPE)
    values = {}
    if base not in (None, "none"):
        values = recipe_values(base, path, seen + (path.resolve(),))
    for k, v in loaded.items():
        if k not in FIELDS:
            raise _unknown(k, where)
        loaded[k] = _coerce(k, v, where)
    return merge(values, loaded)


def _set_term(objective: list, sub: str, value) -> list:
    name, _, key = sub.partition(".")
    if not key:
        raise ConfigError(f"override: objective.{sub} needs a key: objective.NAME.KEY=VALUE "
                          f"(e.g. objective.{name}.weight=0.5)")
    entries = [dict(e) for e in objective]
    hit = [e for e in entries if entry_name(e) == name]
    if not hit:
        if name not in TERMS:
            have = ", ".join(entry_name(e) for e in entries)
            raise ConfigError(f"override: objective has no term named {name!r} (it has {have}; "
                              f"terms to add: {', '.join(TERMS)})")
        hit = [{"term": name, "weight": 1.0}]
        entries.append(hit[0])
    if key == "term":
        raise ConfigError("override: a term's kind cannot change; set its weight to 0 and add another")
    hit[0][key] = value
    return entries


def load_config(recipe: str | Path | None = None, overrides: list[str] = (), *,
                require_models: bool = True) -> TrainConfig:
    """The recipe's config with ``overrides`` applied, checked (``TrainConfig.check``; ``require_models=False``
    lets the student and teacher be missing, for ``--print-config``)."""
    values: dict = recipe_values(recipe) if recipe is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        top, _, sub = key.partition(".")
        if top in OLD_SAMPLING or top in OLD_OBJECTIVE:
            raise _old_override_error(key, value)
        if top not in FIELDS:
            raise _unknown(top, "override: ")
        if sub and top == "objective":
            values["objective"] = _set_term(values.get("objective", FIELDS[top].default_factory()), sub, value)
        elif sub:
            if HINTS[top] is not dict:
                raise ConfigError(f"override: {top!r} is not a mapping; use {top}=VALUE")
            d = dict(values.get(top, FIELDS[top].default_factory()))  # type: ignore[misc]
            d[sub] = value
            values[top] = d
        else:
            values[top] = _coerce(top, value, "override: ")
    return TrainConfig(**values).check(require_models)


def config_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (``lmdistill train ... --print-config``); loadable as a recipe. A student or a
    teacher the run needs but the config lacks is printed empty and marked ``# required``."""
    text = yaml.safe_dump({"base": "none", **dataclasses.asdict(cfg)}, sort_keys=False, default_flow_style=None,
                          width=120)
    marks = {}
    if not cfg.student:
        marks["student"] = "required: a model folder or hub id"
    if not cfg.teacher and cfg.needs_teacher:
        marks["teacher"] = (f"required by this recipe: a model folder or hub id, cache:DIR or openai:NAME@URL")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        key = line.partition(":")[0]
        if key in marks and line == f"{key}: ''":
            lines[i] = f"{line}  # {marks[key]}"
    return "\n".join(lines) + "\n"
