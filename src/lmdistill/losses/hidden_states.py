"""Hidden-state distillation: the student's layer outputs pulled towards the teacher's (Minitron, DistillKit).

For each (student layer s, teacher layer t) of the layer map (:mod:`.layer_map`) and each position p of the mask,
with ``h_s`` the student's output, ``h_t`` the teacher's and ``W`` the learned projection (identity when the widths
are equal and ``projection: auto``):

- ``hidden_cosine``: ``L = mean_pairs mean_p [1 - cos(W h_s, h_t)]``, ``cos(x, y) = x.y / (|x| |y|)``
  (DistillKit ``lossfuncs/hidden_state.py:53-56``; ModelOpt ``plugins/megatron.py:243-289``);
- ``hidden_mse``: ``L = mean_pairs mean_p mean_j (W h_s - h_t)_j^2`` (DistillKit ``hidden_state.py:49-52``,
  ModelOpt ``MSELoss``, ``megatron.py:222-240``: the mean over positions and hidden units).

Positions (``positions``): ``trained`` (default) are the logit terms' positions, those whose next token is trained
(``loss_mask[:, 1:]`` over positions 0..T-2, the token set ``sequences``): ModelOpt applies the batch's one loss
mask to its logit and intermediate losses alike; ``all`` is every non-padding position, prompt included (token set
``positions``), as Minitron's pre-training data has no prompt.

The projection ``W`` (``Linear(h_s -> h_t)``, with a bias, weight ~ N(0, 0.02), bias 0: ModelOpt's
``ProjectionLayer``, ``megatron.py:519-553``) is one module shared by every pair (``shared_projection: true``, as
ModelOpt, ``megatron.py:138-139``) or one per pair (DistillKit ``hsd_mapping.py:24-31``). It is the term's
parameter: trained with the student (the trainer's optimiser takes the objective's parameters), saved in every
checkpoint (``objective.pt``) and, at export, in ``OUTPUT_DIR/hidden_projection.safetensors`` (never in ``final/``).

The teacher must give its layer outputs (capability ``hidden_states``: a model in this process); a cache, a server
or a teacher of another tokenizer is refused before anything loads. The layer outputs come from the forwards the
logit terms run anyway (:meth:`TermInputs.student_layer_states`).
"""

from __future__ import annotations

import json

import torch
from torch import nn

from lmdistill.errors import ConfigError
from lmdistill.losses.layer_map import check_layers, describe, layer_map
from lmdistill.losses.layer_states import model_layout
from lmdistill.losses.masking import graph_zero
from lmdistill.losses.term import Term, TermContext, TermInputs
from lmdistill.runtime import rank_world

POSITIONS = ("trained", "all")
PROJECTIONS = ("auto", "always")
INIT_STD = 0.02   # ModelOpt: ProjectionLayer._init_weights with the config's init_method (std 0.02 by default)


def pair_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the rows ``[N, H]`` of ``1 - cos`` (``cosine``) or of the mean squared difference (``mse``)."""
    if student.shape[0] == 0:
        return graph_zero(student)
    if kind == "cosine":
        return (1 - nn.functional.cosine_similarity(student, teacher, dim=-1)).mean()
    return (student - teacher).pow(2).mean()


class HiddenStateTerm(Term):
    """A hidden-state term (``kind`` ``cosine`` or ``mse``) over a layer map; bound to the run's models by
    :meth:`bind` (layer map, projection), before the optimiser is made."""

    needs_teacher = True
    chunkable = True   # reads no logits: the same value on the chunked path
    kind = ""

    def __init__(self, layers="auto", embed: bool = False, final: bool = False, positions: str = "trained",
                 projection: str = "auto", shared_projection: bool = True):
        super().__init__()
        self.spec, self.embed, self.final = layers, bool(embed), bool(final)
        self.positions, self.projection_mode, self.shared = positions, projection, bool(shared_projection)
        self.tokens = "sequences" if positions == "trained" else "positions"
        self.pairs: list[tuple] = []
        self.map_kind = ""
        self.projection = None

    @classmethod
    def check_params(cls, params: dict, where: str) -> None:
        super().check_params(params, where)
        if "layers" in params:
            check_layers(params["layers"], where)
        for key in ("embed", "final", "shared_projection"):
            if key in params and not isinstance(params[key], bool):
                raise ConfigError(f"{where}: {key} must be true or false, got {params[key]!r}")
        if params.get("positions", "trained") not in POSITIONS:
            raise ConfigError(f"{where}: positions must be trained or all, got {params['positions']!r}")
        if params.get("projection", "auto") not in PROJECTIONS:
            raise ConfigError(f"{where}: projection must be auto (a Linear where the widths differ) or always, "
                              f"got {params['projection']!r}")

    @classmethod
    def teacher_needs(cls, params: dict) -> tuple[tuple[str, ...], float | None]:
        return ("hidden_states",), None

    @property
    def name(self) -> str:
        return f"hidden_{self.kind}"

    def bind(self, context: TermContext) -> None:
        """The layer map from both models' depths (and the student's ``prune.json``), and the projection where the
        widths differ (or ``projection: always``); says which map it uses, once."""
        if context.teacher is None:
            raise ConfigError(f"objective ({self.name}): reads the teacher's hidden states; the run has no teacher")
        n_s, w_s = model_layout(context.student)
        n_t, w_t = context.teacher.layer_shape()
        self.pairs, self.map_kind = layer_map(self.spec, student_path=context.student_path, n_student=n_s,
                                              n_teacher=n_t, embed=self.embed, final=self.final,
                                              where=f"objective ({self.name})")
        self.widths = (w_s, w_t)
        if self.projection_mode == "always" or w_s != w_t:
            count = 1 if self.shared else len(self.pairs)
            self.projection = nn.ModuleList([nn.Linear(w_s, w_t) for _ in range(count)])
            with torch.no_grad():
                for lin in self.projection:
                    lin.weight.normal_(0.0, INIT_STD)
                    lin.bias.zero_()
        if rank_world()[0] == 0:
            proj = (f"; projection Linear({w_s} -> {w_t}){' shared' if self.shared else ' per pair'}"
                    if self.projection is not None else "")
            print(f"[lmdistill] {self.name}: {describe(self.pairs, self.map_kind, context.student_path)}{proj}; "
                  f"positions {self.positions}", flush=True)

    def layers_read(self) -> tuple[tuple, tuple]:
        return tuple(s for s, _ in self.pairs), tuple(t for _, t in self.pairs)

    def _select(self, inputs: TermInputs, states: torch.Tensor) -> torch.Tensor:
        if self.positions == "all":
            return states[inputs.sequences["attention_mask"].bool()]
        return states[:, :-1][inputs.targets[1].bool()]

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        if not self.pairs:
            raise ConfigError(f"{self.name}: not bound to the run's models (Objective(entries, TermContext(...)))")
        students, teachers = self.layers_read()
        hs = inputs.student_layer_states(students)
        ht = inputs.teacher_layer_states(teachers)
        total = None
        for i, (s, t) in enumerate(zip(hs, ht)):
            s = self._select(inputs, s)
            if self.projection is not None:
                s = self.projection[0 if self.shared else i](s)
            dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
            loss = pair_loss(self.kind, s.to(dtype), self._select(inputs, t).detach().to(dtype))
            total = loss if total is None else total + loss
        return total / len(self.pairs)

    def chunked(self, inputs: TermInputs) -> torch.Tensor:
        return self(inputs)

    def artifacts(self) -> dict[str, tuple[dict, dict]]:
        """The projection, for ``OUTPUT_DIR/hidden_projection.safetensors`` (with the layer map as metadata)."""
        if self.projection is None:
            return {}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.projection.state_dict().items()}
        meta = {"pairs": json.dumps([list(p) for p in self.pairs]), "map": self.map_kind,
                "widths": json.dumps(list(self.widths)), "shared": json.dumps(self.shared)}
        return {"hidden_projection.safetensors": (tensors, meta)}

    def extra_repr(self) -> str:
        return f"layers={self.spec!r}, positions={self.positions}, projection={self.projection_mode}"


class HiddenCosineTerm(HiddenStateTerm):
    """``mean_pairs mean_p [1 - cos(W h_s, h_t)]`` (formulas: module docstring)."""

    kind = "cosine"


class HiddenMSETerm(HiddenStateTerm):
    """``mean_pairs mean_p mean_j (W h_s - h_t)_j^2`` (formulas: module docstring)."""

    kind = "mse"
