"""Recipe configuration: one YAML file plus ``key=value`` overrides, checked before any model loads.

An unknown key names the closest valid key; a wrong type names the key and the type it needs.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmdistill.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parents[3] / "recipes"
POLICIES = ("gold", "student", "teacher", "mixed", "switch", "scrg", "replay", "teacher_mix")
LOSSES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "symkl", "dac_kl", "none", "pg_rkl")


@dataclass
class TrainConfig:
    """Every setting of ``lmdistill train``. Recipes in ``recipes/`` set the method's defaults."""

    # models and data
    student: str = ""
    teacher: str = ""
    data: str = "dolly:train"
    valid_data: str = "dolly:valid"
    output_dir: str = "runs/train"
    template: str = "alpaca"
    max_prompt_length: int = 256
    max_length: int = 512
    max_train_examples: int = 0            # 0 = all
    # method
    method: str = ""                        # informational name (sft, kd, gkd, ...)
    paper: str = ""
    policy: str = "gold"                    # where the distilled sequences come from
    loss: str = "none"                      # distillation divergence on those sequences
    loss_params: dict = field(default_factory=dict)
    temperature: float = 1.0                # distillation temperature
    chunked_loss: bool = False              # token-chunked fused LM-head + loss: for 100k+ vocabularies
    sft_weight: float = 1.0                 # weight of cross-entropy on the gold response
    kd_weight: float = 0.0                  # weight of the divergence on the policy's sequences
    seq_sft_weight: float = 0.0             # cross-entropy on the policy's sequences (SeqKD)
    span_weight: float = 0.0                # MGSR span-correlation weight
    span_prior: str = "phrase"
    dac_kl: dict = field(default_factory=dict)  # DACKL module settings
    # generation (on-policy methods)
    max_new_tokens: int = 128
    gen_temperature: float = 1.0
    gen_top_k: int = 0
    gen_top_p: float = 1.0
    gen_decoder: str = "auto"              # auto | fast | hf (generation/fast_decoder.py)
    mix_lambda: float = 0.5                 # mixed: probability of a student sample
    tau0: float = 0.3                       # switch
    lam: float = 0.1                        # switch
    n_corrections: int = 1                  # scrg
    teacher_mix_alpha: float = 0.2          # minillm teacher-mixed sampling
    # distillm adaptive off-policy
    replay_capacity: int = 1000
    replay_init_threshold: float = 0.2
    replay_threshold_step: float = 0.1
    replay_loss_eps: float = 0.1
    # minillm
    pg_clip: float = 0.2
    pg_length_norm: bool = True
    # optimisation
    lr: float = 5e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_steps: int = 100
    batch_size: int = 8                     # global batch (sequences per optimiser step)
    micro_batch_size: int = 8               # per process per forward
    clip_grad: float = 1.0
    lr_schedule: str = "cosine"
    mixed_precision: str = "auto"           # auto | no | bf16
    # LoRA
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # bookkeeping
    seed: int = 42
    save_steps: int = 50
    keep_checkpoints: int = 2
    eval_steps: int = 50
    eval_limit: int = 32                    # validation examples for ROUGE-L
    eval_max_new_tokens: int = 64
    log_steps: int = 1
    max_bad_steps: int = 10
    teacher_dtype: str = "float32"
    student_dtype: str = "float32"
    device: str = "auto"
    progress: bool = True

    def check(self) -> "TrainConfig":
        if not self.student:
            raise ConfigError("student: is required (a model folder or hub id)")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy: {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss: {self.loss!r} is not one of {', '.join(LOSSES)}")
        needs_teacher = (self.policy not in ("gold", "student") or (self.loss != "none" and self.kd_weight > 0)
                         or self.span_weight > 0)
        if needs_teacher and not self.teacher:
            raise ConfigError(f"teacher: is required for policy={self.policy}, loss={self.loss}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                              f"({self.micro_batch_size})")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ConfigError("lr_schedule: must be one of cosine, linear, constant")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise ConfigError("mixed_precision: must be one of auto, no, bf16")
        if self.gen_decoder not in ("auto", "fast", "hf"):
            raise ConfigError(f"gen_decoder: must be one of auto, fast, hf, got {self.gen_decoder!r}")
        if self.chunked_loss and (self.loss in ("dac_kl", "pg_rkl") or self.span_weight > 0):
            raise ConfigError("chunked_loss: works with the divergences (fkl, rkl, jsd, tvd, skl, srkl, symkl) and sft; "
                              f"not with loss={self.loss} or span_weight > 0")
        if self.loss not in ("none", "dac_kl", "pg_rkl"):
            from lmdistill.losses import get_loss

            try:
                get_loss(self.loss, **self.loss_params)
            except ConfigError as e:
                raise ConfigError(f"loss_params: {e}") from None
        for k in ("max_steps", "batch_size", "micro_batch_size", "save_steps", "eval_steps"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{k}: must be > 0, got {getattr(self, k)}")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)


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
    raise ConfigError(f"{where}key {key!r} must be {want.__name__}, got {type(value).__name__} {value!r}")


def parse_override(text: str) -> tuple[str, object]:
    """``key=value``; the value is parsed as YAML (numbers, booleans, lists, dicts). Dotted keys set dict
    entries: ``loss_params.beta=0.5``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    values: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            builtin = RECIPES_DIR / f"{recipe}.yaml"
            if builtin.is_file() and path.suffix != ".yaml":
                path = builtin
            else:
                names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
                raise ConfigError(f"{recipe}: no such recipe file or built-in recipe ({names})")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: must be a mapping of key: value")
        for k, v in loaded.items():
            if k not in FIELDS:
                raise _unknown(k, f"{path}: ")
            values[k] = _coerce(k, v, f"{path}: ")
    for text in overrides:
        key, value = parse_override(text)
        top, _, sub = key.partition(".")
        if top not in FIELDS:
            raise _unknown(top, "override: ")
        if sub:
            if HINTS[top] is not dict:
                raise ConfigError(f"override: {top!r} is not a mapping; use {top}=VALUE")
            d = dict(values.get(top, FIELDS[top].default_factory()))  # type: ignore[misc]
            d[sub] = value
            values[top] = d
        else:
            values[top] = _coerce(top, value, "override: ")
    return TrainConfig(**values).check()
