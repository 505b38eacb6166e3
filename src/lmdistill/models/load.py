"""Load models and tokenizers from local folders or hub ids, with clear errors offline."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmdistill.errors import ModelLoadError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _explain(name: str, err: Exception) -> ModelLoadError:
    if Path(name).exists():
        return ModelLoadError(f"{name}: is a local path but not a loadable model folder ({type(err).__name__}: {err})")
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        return ModelLoadError(f"{name}: no such local folder")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return ModelLoadError(
        f"{name}: not a local folder, and the hub id could not be loaded"
        + (" (HF_HUB_OFFLINE=1 is set)" if offline else " (no network access to the hub, or no such model)")
        + ". Download it on a machine with network access (huggingface-cli download) and pass the folder.")


def _load(loader, name: str, **kwargs):
    """Local folders load directly; hub ids try the local cache first, then the hub, once."""
    name = str(name)
    if Path(name).is_dir():
        try:
            return loader.from_pretrained(name, **kwargs)
        except Exception as e:
            raise _explain(name, e) from None
    try:
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise _explain(name, RuntimeError("offline"))
    try:
        return loader.from_pretrained(name, **kwargs)
    except Exception as e:
        raise _explain(name, e) from None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = _load(AutoTokenizer, name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, *, dtype: str | torch.dtype | None = "float32", device: str | None = None,
               trainable: bool = False):
    """Load a causal LM (a folder, hub id, or LoRA adapter folder, merged on load)."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(dtype)
    adapter_cfg = Path(name) / "adapter_config.json"
    if adapter_cfg.exists():
        model = _load_lora_merged(name, dtype)
    else:
        model = _load(AutoModelForCausalLM, name, dtype=dtype)
    model.to(resolve_device(device))
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def _load_lora_merged(path: str, dtype):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_name = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = _load(AutoModelForCausalLM, base_name, dtype=dtype)
    try:
        return PeftModel.from_pretrained(base, path).merge_and_unload()
    except Exception as e:
        raise ModelLoadError(f"{path}: LoRA adapter could not be applied to {base_name} ({e})") from None


def load_model_and_tokenizer(name: str, **kwargs):
    tok_src = name
    adapter_cfg = Path(name) / "adapter_config.json"
    if adapter_cfg.exists() and not (Path(name) / "tokenizer_config.json").exists():
        import json

        tok_src = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
    return load_model(name, **kwargs), load_tokenizer(tok_src)
