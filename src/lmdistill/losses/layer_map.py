"""Which student layer is compared with which teacher layer: explicit pairs, ``uniform``, or ``prune``.

Layers are named as in :mod:`.layer_states`: ``"embed"``, a block index ``i`` (0-based output of decoder block i),
``"final"`` (the final norm's output). With n student blocks and m teacher blocks:

- ``uniform``: student block i is paired with teacher block ``t(i) = floor((i + 1) * m / n + 1/2) - 1``, i.e. the
  teacher block that ends the same fraction ``(i + 1) / n`` of the depth (rounded half up), so the last blocks are
  always paired and ``n = m`` is the identity;
- ``prune``: student block i is paired with the teacher block it was cut from, ``kept_layers[i]`` of the student's
  ``prune.json`` (written by ``lmdistill models prune``, ``models/prune.py``); a width-only prune keeps every block;
- explicit pairs ``[[s, t], ...]`` of block indices, ``embed`` or ``final``;
- ``auto`` (the default): ``prune`` when the student folder has a ``prune.json``, ``uniform`` otherwise.

``embed: true`` adds the pair (embed, embed) in front, ``final: true`` the pair (final, final) at the end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmdistill.errors import ConfigError
from lmdistill.losses.layer_states import SPECIAL

MAPS = ("auto", "prune", "uniform")


def _is_layer(x) -> bool:
    return x in SPECIAL or (isinstance(x, int) and not isinstance(x, bool) and x >= 0)


def check_layers(layers, where: str) -> None:
    """A ``layers`` parameter's form (``auto``, ``prune``, ``uniform`` or a list of distinct ``[s, t]`` pairs);
    the indices are checked against the models when the term is bound."""
    if isinstance(layers, str):
        if layers not in MAPS:
            raise ConfigError(f"{where}: layers must be one of {', '.join(MAPS)} or a list of [student, teacher] "
                              f"pairs, got {layers!r}")
        return
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ConfigError(f"{where}: layers must be one of {', '.join(MAPS)} or a non-empty list of "
                          f"[student, teacher] pairs, got {layers!r}")
    for pair in layers:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_is_layer(x) for x in pair)):
            raise ConfigError(f"{where}: each layer pair is [student, teacher] with a block index >= 0, embed or "
                              f"final on each side, got {pair!r}")
    pairs = [tuple(p) for p in layers]
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"{where}: layers lists a pair twice: {layers!r}")


def uniform_pairs(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """``[(i, floor((i + 1) * m / n + 1/2) - 1)]`` for the n student blocks (m teacher blocks)."""
    return [(i, max(0, math.floor((i + 1) * n_teacher / n_student + 0.5) - 1)) for i in range(n_student)]


def prune_pairs(student_path: str, n_student: int, n_teacher: int, where: str) -> list[tuple[int, int]]:
    """``[(i, kept_layers[i])]`` from ``student_path/prune.json``, checked against both models' block counts."""
    path = Path(student_path) / "prune.json"
    if not path.is_file():
        raise ConfigError(f"{where}: layers: prune reads the student's prune.json (written by `lmdistill models "
                          f"prune`), and {student_path or 'the student'} has none; use layers: uniform or pairs")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot be read as JSON ({e})") from None
    kept = info.get("kept_layers") if isinstance(info, dict) else None
    before = info.get("layers_before") if isinstance(info, dict) else None
    if not (isinstance(kept, list) and kept and all(isinstance(k, int) and not isinstance(k, bool) for k in kept)):
        raise ConfigError(f"{path}: field kept_layers must be a non-empty list of block indices, got {kept!r}")
    if len(kept) != n_student:
        raise ConfigError(f"{path}: kept_layers lists {len(kept)} blocks, the student has {n_student}")
    if before is not None and before != n_teacher:
        raise ConfigError(f"{path}: the student was cut from a model of {before} blocks (layers_before), the "
                          f"teacher has {n_teacher}: the prune map pairs it with the model it was pruned from (set layers: uniform "
                          "or pairs for another teacher)")
    if any(not 0 <= k < n_teacher for k in kept):
        raise ConfigError(f"{path}: kept_layers {kept} holds a block the teacher ({n_teacher} blocks) does not have")
    return list(enumerate(kept))


def layer_map(layers, *, student_path: str, n_student: int, n_teacher: int, embed: bool = False,
              final: bool = False, where: str = "layers") -> tuple[list[tuple], str]:
    """The (student layer, teacher layer) pairs and which map gave them (``prune``, ``uniform``, ``pairs``)."""
    check_layers(layers, where)
    how = layers if isinstance(layers, str) else "pairs"
    if how == "auto":
        how = "prune" if student_path and (Path(student_path) / "prune.json").is_file() else "uniform"
    if how == "prune":
        pairs = prune_pairs(student_path, n_student, n_teacher, where)
    elif how == "uniform":
        pairs = uniform_pairs(n_student, n_teacher)
    else:
        pairs = [tuple(p) for p in layers]
        for s, t in pairs:
            for side, x, n in (("student", s, n_student), ("teacher", t, n_teacher)):
                if isinstance(x, int) and x >= n:
                    raise ConfigError(f"{where}: pair [{s}, {t}]: the {side} has blocks 0..{n - 1}")
    if embed and ("embed", "embed") not in pairs:
        pairs = [("embed", "embed"), *pairs]
    if final and ("final", "final") not in pairs:
        pairs = [*pairs, ("final", "final")]
    return pairs, how


def describe(pairs: list[tuple], how: str, student_path: str = "") -> str:
    """One line naming the map and its pairs (student -> teacher)."""
    source = {"prune": f" (from {Path(student_path) / 'prune.json'})", "uniform": " (t = round((i+1)*m/n) - 1)"}
    shown = ", ".join(f"{s}->{t}" for s, t in pairs)
    return f"layer map {how}{source.get(how, '')}: student->teacher {shown}"
