"""The outputs of a causal LM's layers, caught during whatever forward runs (hidden-state distillation).

A layer is named ``"embed"`` (the input embeddings' output, which the first decoder block reads: HF's
``hidden_states[0]``; Gemma's scale by sqrt(hidden) included, it happens inside its embedding module), an integer
``i`` (the output of decoder block ``i``, 0-based, before any final norm) or ``"final"`` (the decoder's output,
i.e. the final norm's: HF's ``last_hidden_state``). HF's ``output_hidden_states`` gives block ``i``'s output as
``hidden_states[i + 1]`` for every block but the last, whose entry is replaced by the normed ``last_hidden_state``
(``transformers/utils/output_capturing.py``, ``tie_last_hidden_states``); forward hooks have no such gap.

:func:`recording` puts forward hooks on those modules for the length of a ``with`` block, so the student's logit
forward (which the logit terms run anyway) or the teacher's also yields the layer outputs: no second forward.
Hooks work on wrapped models (peft's LoRA, DDP's ``.module``) and on FSDP2-sharded ones (parameters are sharded,
activations are not). :func:`recorded_forward` runs a forward only for the layers (``logits_to_keep=1``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from lmdistill.errors import ConfigError
from lmdistill.losses.model_forward import positions
from lmdistill.losses.model_logits import base_model

SPECIAL = ("embed", "final")


def _decoder(model):
    inner = base_model(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(f"hidden-state terms: cannot find the decoder blocks of {type(inner).__name__} "
                          "(no get_decoder().layers)")
    return inner, decoder, layers


def model_layout(model) -> tuple[int, int]:
    """``(decoder blocks, hidden width)`` of ``model`` (wrapped or not; a multimodal config's text part)."""
    inner, _, layers = _decoder(model)
    config = inner.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return len(layers), int(text.hidden_size)


def _output(out) -> torch.Tensor:
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def recording(model, names) -> Iterator[dict]:
    """Within the block, every forward of ``model`` stores the output of each layer in ``names`` in the yielded
    dict (``name -> [B, T, H]``; a later forward overwrites). Unknown names raise ``ConfigError``."""
    inner, decoder, layers = _decoder(model)
    caught: dict = {}
    modules = {}
    for name in dict.fromkeys(names):
        if name == "embed":
            modules[name] = inner.get_input_embeddings()
        elif name == "final":
            modules[name] = decoder
        elif isinstance(name, int) and not isinstance(name, bool) and 0 <= name < len(layers):
            modules[name] = layers[name]
        else:
            raise ConfigError(f"layer {name!r}: not one of embed, final or a block index in 0..{len(layers) - 1}")

    def keep(name):
        def hook(_module, _inputs, out):
            caught[name] = _output(out)
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
    try:
        yield caught
    finally:
        for h in handles:
            h.remove()


def recorded_forward(model, batch: dict, names) -> dict:
    """``name -> output`` of the layers ``names`` on ``batch`` (``input_ids``, ``attention_mask``), from one
    forward that computes logits at the last position only."""
    attn = batch["attention_mask"]
    with recording(model, names) as caught:
        model(input_ids=batch["input_ids"], attention_mask=attn, position_ids=positions(attn), logits_to_keep=1)
    return dict(caught)
