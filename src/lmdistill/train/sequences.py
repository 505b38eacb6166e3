"""Where the distilled sequences come from: the recipe's ``policy`` as a source of training batches.

A source is one policy of a recipe (``policy: {name: NAME, ...its parameters}``; ``train/sources.py`` lists them):
its class declares ``name``, ``Params`` (a frozen dataclass of its knobs), what it asks of the teacher
(``teacher_needs(params)``: capabilities any one of which will do), which fields beside the tokens its batches
carry (``provides(params)``: e.g. ``old_logprobs`` with their temperature) and whether it writes new sequences
(``generator(params)``: the engine policy it samples with, or ``None``). An instance has ``build(rows, step=,
micro=, rank=, student=, teacher=, tokenizer=)`` -> :class:`SequenceBatch`, may carry state across steps (``state()``
/ ``load_state()``, saved in checkpoints) and react to validation (``observe_validation(metrics)``). The trainer
calls only these, so it knows no policy by name.

- ``gold``: the dataset's responses (the gold batch itself; one student forward serves every term);
- ``student``, ``teacher``, ``mixed``, ``switch``, ``scrg``, ``teacher_mix``: the sequence engine
  (``lmdistill.generation``), sampling with the recipe's ``sampling:`` settings;
- ``replay``: DistiLLM's adaptive off-policy scheme (``replay.py``).

Every sequence becomes a right-padded batch, so the objective sees one layout for gold and generated rows: gold
and replayed rows through ``collate_for_training``, generated rows as the engine's own output
(``GenerationOutput.right_padded``, the same layout without re-collating). Off-policy rows of ``mixed`` carry the
whole gold response (the engine keeps it whole).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from lmdistill.data.collate import collate_for_training
from lmdistill.data.tokenize import TokenizedExample
from lmdistill.errors import ConfigError
from lmdistill.generation import POLICIES as ENGINE_POLICIES
from lmdistill.generation import generate
from lmdistill.generation.policies import NoParams, make_params, params_dict
from lmdistill.train.data_order import step_seed
from lmdistill.train.replay import ReplayBuffer


@dataclass
class SequenceBatch:
    batch: dict                       # collate_for_training output
    rows: list[TokenizedExample]
    stats: dict = field(default_factory=dict)          # means over rows, logged as metrics
    row_stats: list[dict] = field(default_factory=list)   # the engine's per-row statistics (origin, ...)
    is_gold: bool = False             # the batch is the step's gold rows themselves
    fields: dict = field(default_factory=dict)         # per-batch values the terms read (mix_alpha, ...)


def summarise_stats(stats: list[dict]) -> dict:
    """Mean of the numeric per-sequence statistics (teacher-token fraction, correction position, ...)."""
    sums: dict[str, list[float]] = {}
    for s in stats:
        for k, v in s.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sums.setdefault(k, []).append(float(v))
            elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v) and k != "jsd_trace":
                sums.setdefault(k, []).append(float(sum(v)) / len(v))
    return {f"gen/{k}": sum(v) / len(v) for k, v in sums.items()}


def engine_arguments(teacher) -> dict:
    """How the sequence engine takes ``teacher`` (a :class:`~lmdistill.teachers.base.Teacher`): its model when it
    runs here (next-token steps), else as a scorer of whole sequences when it is one (a served teacher)."""
    if teacher is None:
        return {}
    if teacher.capabilities.steps:
        return {"teacher": teacher.model}
    return {"scorer": teacher} if teacher.capabilities.sequence_scores else {}


class GoldSequences:
    """``gold``: the dataset's responses."""

    name = "gold"
    Params = NoParams

    def __init__(self, cfg, params=None):
        self.cfg = cfg
        self.params = self.Params() if params is None else params

    @classmethod
    def teacher_needs(cls, params) -> tuple[str, ...]:
        """The teacher capabilities the policy needs to write its sequences (any one of them; ``()``: none)."""
        return ()

    @classmethod
    def generator(cls, params) -> str | None:
        """The engine policy that writes new sequences (``None``: the sequences are fixed in advance)."""
        return None

    @classmethod
    def provides(cls, params) -> dict[str, dict]:
        """Fields beside the tokens its batches carry, with their properties (``Term.needs_fields`` must match)."""
        return {}

    def gold(self, rows, tokenizer, stats: dict | None = None) -> SequenceBatch:
        return SequenceBatch(collate_for_training(rows, tokenizer.pad_token_id), rows, stats or {}, is_gold=True)

    def build(self, rows, *, step, micro, rank, student, teacher, tokenizer) -> SequenceBatch:
        return self.gold(rows, tokenizer)

    def state(self) -> dict | None:
        return None

    def load_state(self, state: dict | None) -> None:
        pass

    def observe_validation(self, metrics: dict) -> None:
        pass

    #: The trainer validates once before the first step when a source sets this.
    needs_initial_validation = False


class GeneratedSequences(GoldSequences):
    """Sequences an engine policy writes on the rows' prompts (one subclass per engine policy, :func:`generated`)."""

    engine = None   # the generation Policy

    @classmethod
    def teacher_needs(cls, params) -> tuple[str, ...]:
        return cls.engine.teacher_needs(params, all_gold=True)   # training rows always carry their gold response

    @classmethod
    def generator(cls, params) -> str | None:
        return cls.engine.name

    @classmethod
    def provides(cls, params) -> dict[str, dict]:
        return {k: {} for k in cls.engine.batch_fields(params)}

    def fields(self) -> dict:
        return self.engine.batch_fields(self.params)

    def generated(self, rows, seed: int, student, teacher, tokenizer, extra: dict | None = None, *,
                  engine=None, params=None) -> SequenceBatch:
        engine, params = engine or self.engine, self.params if params is None else params
        out = generate(student, [r.prompt_ids for r in rows], policy=engine.name, gold=[r.response_ids for r in rows],
                       config=self.cfg.sampling_config(seed), params=params, pad_id=tokenizer.pad_token_id,
                       eos_id=tokenizer.eos_token_id, **engine_arguments(teacher))
        new_rows = [TokenizedExample(r.id, r.prompt_ids, resp, r.example) for r, resp in zip(rows, out.responses)]
        stats = {**summarise_stats(out.stats), **(extra or {})}
        return SequenceBatch(out.right_padded(tokenizer.pad_token_id), new_rows, stats, out.stats,
                             fields=self.fields())

    def build(self, rows, *, step, micro, rank, student, teacher, tokenizer) -> SequenceBatch:
        return self.generated(rows, step_seed(self.cfg.seed, step, rank, micro), student, teacher, tokenizer)


def generated(engine) -> type[GeneratedSequences]:
    """The source class of one engine policy (``student``, ``switch``, ...): its name, parameters and needs."""
    return type(f"{engine.name.title().replace('_', '')}Sequences", (GeneratedSequences,),
                {"name": engine.name, "Params": engine.Params, "engine": engine,
                 "__doc__": f"``{engine.name}``: sequences the engine's ``{engine.name}`` policy writes."})


@dataclass(frozen=True)
class ReplayParams:
    """DistiLLM's adaptive off-policy scheme (``replay.py``): a buffer of ``capacity`` samples, threshold starting at
    ``init_threshold`` and rising by ``threshold_step`` when the validation loss exceeds its reference by
    ``loss_eps``; ``generator``: the engine policy whose samples fill the buffer (``student`` as DistiLLM; ``scrg``
    for MGSR), with its own parameters (``{name: scrg, rounds: 1}``)."""

    capacity: int = 1000
    init_threshold: float = 0.0
    threshold_step: float = 0.1
    loss_eps: float = 0.1
    generator: dict = field(default_factory=lambda: {"name": "student"})

    def __post_init__(self):
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 1:
            raise ConfigError(f"capacity: must be an integer >= 1, got {self.capacity!r}")
        for k in ("init_threshold", "threshold_step"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
                raise ConfigError(f"{k}: must be in [0, 1], got {v!r}")
        if not (isinstance(self.loss_eps, (int, float)) and math.isfinite(self.loss_eps) and self.loss_eps >= 0):
            raise ConfigError(f"loss_eps: must be a finite number >= 0, got {self.loss_eps!r}")
        gen = {"name": self.generator} if isinstance(self.generator, str) else self.generator
        if not isinstance(gen, dict) or gen.get("name") not in ENGINE_POLICIES:
            raise ConfigError(f"generator: must name an engine policy ({', '.join(ENGINE_POLICIES)}), "
                              f"e.g. {{name: scrg, rounds: 1}}; got {self.generator!r}")
        engine = ENGINE_POLICIES[gen["name"]]
        full = params_dict(make_params(engine.Params, {k: v for k, v in gen.items() if k != "name"}, "generator"))
        object.__setattr__(self, "generator", {"name": engine.name, **full})

    @property
    def engine(self):
        return ENGINE_POLICIES[self.generator["name"]]

    @property
    def engine_params(self):
        return make_params(self.engine.Params, {k: v for k, v in self.generator.items() if k != "name"}, "generator")


class ReplaySequences(GeneratedSequences):
    """``replay``: DistiLLM's adaptive off-policy scheme over a replay buffer of samples of ``generator``
    (``student`` as DistiLLM; ``scrg`` for MGSR, whose SCRG-revised student outputs fill the buffer) (``replay.py``).

    Its threshold reacts to the validation loss relative to the loss before training, so it asks the trainer for a
    validation at step 0 (``needs_initial_validation``).
    """

    name = "replay"
    Params = ReplayParams
    needs_initial_validation = True

    @classmethod
    def teacher_needs(cls, params) -> tuple[str, ...]:
        return params.engine.teacher_needs(params.engine_params, all_gold=True)

    @classmethod
    def generator(cls, params) -> str | None:
        return params.engine.name

    @classmethod
    def provides(cls, params) -> dict[str, dict]:
        return {}

    def fields(self) -> dict:
        return {}

    def __init__(self, cfg, params=None):
        super().__init__(cfg, params)
        if self.params.capacity < cfg.micro_batch_size:
            raise ConfigError(f"policy.capacity: must hold at least one micro-batch ({cfg.micro_batch_size}), "
                              f"got {self.params.capacity}")
        self.buffer = ReplayBuffer(self.params.capacity, self.params.init_threshold)

    def build(self, rows, *, step, micro, rank, student, teacher, tokenizer) -> SequenceBatch:
        seed = step_seed(self.cfg.seed, step, rank, micro)
        rng = random.Random(seed)
        action = self.buffer.decide(step, self.cfg.max_steps, rng)
        if action == "gold":
            return self.gold(rows, tokenizer, {"replay/sgo": 0.0})
        if action == "replay":
            items = self.buffer.sample(len(rows), rng)
            new = [TokenizedExample(f"replay-{i}", it["prompt_ids"], it["response_ids"]) for i, it in enumerate(items)]
            return SequenceBatch(collate_for_training(new, tokenizer.pad_token_id), new,
                                 {"replay/sgo": 1.0, "replay/fresh": 0.0})
        out = self.generated(rows, seed, student, teacher, tokenizer, {"replay/sgo": 1.0, "replay/fresh": 1.0},
                             engine=self.params.engine, params=self.params.engine_params)
        self.buffer.push([{"prompt_ids": r.prompt_ids, "response_ids": r.response_ids} for r in out.rows])
        return out

    def state(self) -> dict | None:
        return self.buffer.state()

    def load_state(self, state: dict | None) -> None:
        if state:
            self.buffer = ReplayBuffer.from_state(state)

    def observe_validation(self, metrics: dict) -> None:
        if "val/loss" in metrics:
            self.buffer.observe_val_loss(metrics["val/loss"], self.params.threshold_step, self.params.loss_eps)
