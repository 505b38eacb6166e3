"""Structured pruning of Llama-style causal LMs: whole decoder layers (depth) and MLP channels (width).

Depth (ShortGPT, arXiv 2403.03853). Block Influence of decoder layer i, with x_{i,t} the hidden state of
token t entering layer i and x_{i+1,t} the state leaving it, averaged over the non-padding tokens of the
calibration batches (cosine in float64):

    BI_i = 1 - E_t[ x_{i,t} . x_{i+1,t} / (||x_{i,t}|| ||x_{i+1,t}||) ]

A layer that barely turns its input has a low BI; ``choose_layers`` keeps the ``n_keep`` highest.

Width (Minitron, arXiv 2407.14679). With the MLP's intermediate activation a = act(gate(x)) * up(x) (the
input of ``down_proj``), the importance of channel j aggregates mean over each example's non-padding
tokens, then L2 norm over examples:

    F_j = sqrt( sum_b ( mean_{t in b} |a_{b,t,j}| )^2 )

Pruning keeps the ``ffn_size`` largest F_j per layer (rows of gate/up, columns of down). Depth is pruned
first; channel importance is then measured on the depth-pruned model.

Any decoder with that layout prunes the same way: Llama, Qwen, Mistral, and Gemma-3 (GeGLU MLP, act = gelu_tanh).
Config lists with one entry per layer (``PER_LAYER_KEYS``: Gemma-3's and Qwen's ``layer_types``, sliding or full
attention, which also picks each layer's mask and RoPE base) keep the kept layers' entries. A pruned model is
derived from its source, so the source folder's license files (``LICENSE``, Gemma's ``GEMMA_TERMS.html``) go with it.
"""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path

import torch

from lmdistill.data import format_prompt, load_examples
from lmdistill.errors import ConfigError
from lmdistill.io import atomic_dir, write_json
from lmdistill.models.build import count_parameters
from lmdistill.models.load import load_model, load_tokenizer
from lmdistill.models.model_card import carried_license_files

METHODS = ("block-influence", "uniform")
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder layer
_ROWS = ("mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias")
_PREFIX = "model.layers."


def _layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(getattr(l, "mlp", None), "gate_proj") for l in layers):
        raise ConfigError(f"{type(model).__name__} is not a Llama-style model (needs model.model.layers[i].mlp."
                          "gate_proj/up_proj/down_proj); only those can be pruned")
    return layers


def calibration_batches(tokenizer, *, data="dolly", n_samples=32, max_length=256, batch_size=8, seed=0) -> list[dict]:
    """A seeded sample of ``n_samples`` examples of ``data`` (alpaca prompt + " " + output), tokenized as the
    tokenizer does by default (Gemma's puts ``<bos>`` in front, which its activations depend on; the tiny and SmolLM2
    tokenizers add nothing), cut to ``max_length`` and right-padded into batches of ``input_ids`` /
    ``attention_mask``."""
    if n_samples < 1 or max_length < 1 or batch_size < 1:
        raise ConfigError("calibration needs n_samples, max_length and batch_size >= 1")
    examples = load_examples(data).examples
    picked = [examples[i] for i in random.Random(seed).sample(range(len(examples)), min(n_samples, len(examples)))]
    texts = [format_prompt(ex, "alpaca", tokenizer) + " " + ex.output for ex in picked]
    ids = [list(x)[:max_length] for x in tokenizer(texts, verbose=False)["input_ids"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        batches.append({"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in chunk], dtype=torch.long),
                        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk],
                                                       dtype=torch.long)})
    return batches


def _run(model, batches, desc, progress, on_batch):
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            on_batch(batch["attention_mask"].to(device).bool())
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False)


def block_influence(model, batches, *, progress: bool = False) -> list[float]:
    """ShortGPT Block Influence of every decoder layer (see the module docstring)."""
    layers = _layers(model)
    sums, count, state = [0.0] * len(layers), [0], {}

    def hook(i):
        def fn(module, args, kwargs, output):
            x = (args[0] if args else kwargs["hidden_states"])[state["mask"]].double()
            y = (output[0] if isinstance(output, tuple) else output)[state["mask"]].double()
            sums[i] += ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).sum().item()
        return fn

    def on_batch(mask):
        state["mask"] = mask
        count[0] += int(mask.sum())

    handles = [l.register_forward_hook(hook(i), with_kwargs=True) for i, l in enumerate(layers)]
    try:
        _run(model, batches, "block influence", progress, on_batch)
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / count[0] for s in sums]


def channel_importance(model, batches, *, progress: bool = False) -> list[torch.Tensor]:
    """Minitron MLP channel importance per layer: a float64 tensor [intermediate_size] each."""
    layers = _layers(model)
    sq = [torch.zeros(l.mlp.down_proj.in_features, dtype=torch.float64) for l in layers]
    state = {}

    def hook(i):
        def fn(module, args):
            m = state["mask"].unsqueeze(-1).double()
            mean = (args[0].double().abs() * m).sum(1) / m.sum(1)  # [batch, intermediate]
            sq[i] += (mean ** 2).sum(0).cpu()
        return fn

    handles = [l.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, l in enumerate(layers)]
    try:
        _run(model, batches, "channel importance", progress, lambda mask: state.update(mask=mask))
    finally:
        for h in handles:
            h.remove()
    return [s.sqrt() for s in sq]


def choose_layers(scores: list[float], n_keep: int, method: str = "block-influence") -> list[int]:
    """Indices of the layers to keep, sorted: the ``n_keep`` highest scores, or ``uniform``ly spaced."""
    n = len(scores)
    if method not in METHODS:
        raise ConfigError(f"unknown layer-selection method {method!r}; choose one of {', '.join(METHODS)}")
    if not 1 <= n_keep <= n:
        raise ConfigError(f"layers={n_keep} must be between 1 and the model's {n} layers")
    if method == "uniform":
        return [0] if n_keep == 1 else sorted({round(i * (n - 1) / (n_keep - 1)) for i in range(n_keep)})
    return sorted(sorted(range(n), key=lambda i: (-scores[i], i))[:n_keep])


def prune_model(model, *, keep_layers: list[int] | None = None, keep_channels: list[torch.Tensor] | None = None):
    """A new model of the same class: new layer j is old layer ``keep_layers[j]``; ``keep_channels[j]`` (one
    index tensor per NEW layer, all the same length) are the MLP channels it keeps, in ascending order."""
    layers = _layers(model)
    n = len(layers)
    keep_layers = list(range(n)) if keep_layers is None else [int(i) for i in keep_layers]
    if not keep_layers or len(set(keep_layers)) != len(keep_layers) or not all(0 <= i < n for i in keep_layers):
        raise ConfigError(f"keep_layers must be distinct indices in 0..{n - 1}, got {keep_layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep_layers)
    for key in PER_LAYER_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(config, key, [values[i] for i in keep_layers])
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    channels = None
    if keep_channels is not None:
        size = config.intermediate_size
        channels = [torch.sort(torch.as_tensor(c, dtype=torch.long).flatten().cpu()).values for c in keep_channels]
        m = len(channels[0]) if channels else 0
        if (len(channels) != len(keep_layers) or any(len(c) != m for c in channels) or m < 1
                or any(c.unique().numel() != m or c.min() < 0 or c.max() >= size for c in channels)):
            raise ConfigError(f"keep_channels must hold one tensor per kept layer ({len(keep_layers)}), each of the "
                              f"same number of distinct indices in 0..{size - 1}")
        config.intermediate_size = m
    new_index = {old: new for new, old in enumerate(keep_layers)}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(_PREFIX):
            old, rest = key[len(_PREFIX):].split(".", 1)
            if int(old) not in new_index:
                continue
            j = new_index[int(old)]
            key = f"{_PREFIX}{j}.{rest}"
            if channels is not None and rest in _ROWS:
                value = value[channels[j].to(value.device)]
            elif channels is not None and rest == "mlp.down_proj.weight":
                value = value[:, channels[j].to(value.device)]
        state[key] = value
    param = next(model.parameters())
    new = type(model)._from_config(config, dtype=param.dtype)
    new.load_state_dict(state, strict=True)
    new.to(param.device)
    new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    if not any(p.requires_grad for p in model.parameters()):
        new.requires_grad_(False)
    return new


def prune(model_path, out_dir, *, layers=None, ffn_size=None, method="block-influence", data="dolly",
          n_samples=32, max_length=256, batch_size=8, seed=0, progress=True) -> dict:
    """Prune the model at ``model_path`` to ``layers`` decoder layers and/or ``ffn_size`` MLP channels and write
    it (with the teacher's tokenizer, generation config and a ``prune.json`` report) to ``out_dir``."""
    if layers is None and ffn_size is None:
        raise ConfigError("pruning needs layers and/or ffn_size")
    if method not in METHODS:
        raise ConfigError(f"unknown layer-selection method {method!r}; choose one of {', '.join(METHODS)}")
    model = load_model(str(model_path), dtype="float32", device="cpu")
    tokenizer = load_tokenizer(str(model_path))
    n_layers, ffn_before = len(_layers(model)), model.config.intermediate_size
    if layers is not None and not 1 <= layers <= n_layers:
        raise ConfigError(f"layers={layers} must be between 1 and the model's {n_layers} layers")
    if ffn_size is not None and not 1 <= ffn_size <= ffn_before:
        raise ConfigError(f"ffn_size={ffn_size} must be between 1 and the model's intermediate size {ffn_before}")
    batches = calibration_batches(tokenizer, data=data, n_samples=n_samples, max_length=max_length,
                                  batch_size=batch_size, seed=seed)
    params_before = count_parameters(model)
    kept, scores = list(range(n_layers)), None
    if layers is not None:
        scores = block_influence(model, batches, progress=progress)
        kept = choose_layers(scores, layers, method)
        model = prune_model(model, keep_layers=kept)
    if ffn_size is not None:
        importance = channel_importance(model, batches, progress=progress)
        model = prune_model(model, keep_channels=[torch.argsort(f, descending=True, stable=True)[:ffn_size]
                                                  for f in importance])
    info = {"source": str(model_path), "method": method, "layers_before": n_layers, "kept_layers": kept,
            "block_influence": scores, "ffn_before": ffn_before, "ffn_size": model.config.intermediate_size,
            "calibration": {"data": data, "n_samples": sum(len(b["input_ids"]) for b in batches),
                            "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
                            "max_length": max_length, "batch_size": batch_size, "seed": seed},
            "parameters_before": params_before, "parameters_after": count_parameters(model)}
    source = Path(model_path)
    carried = carried_license_files(source)
    info["license_files"] = [f.name for f in carried]
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        for f in carried:
            shutil.copyfile(f, tmp / f.name)
        write_json(tmp / "prune.json", info)
    return info
