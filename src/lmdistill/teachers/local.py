"""A teacher model in this process: every capability (its logits, hidden states, next-token steps), any temperature.

Under FSDP2 the parallelism strategy shards ``model`` and gathers it for generation (``train/parallel.py``); the
methods here run it as it is.
"""

from __future__ import annotations

import torch

from lmdistill.losses.layer_states import model_layout, recorded_forward, recording
from lmdistill.losses.model_forward import forward_hidden, forward_logits, head_transform, selected_logits
from lmdistill.models import load_model
from lmdistill.teachers.base import Capabilities, Teacher


class LocalTeacher(Teacher):
    kind = "local"
    capabilities = Capabilities(logits=True, hidden_states=True, steps=True, token_logprobs=True)

    def __init__(self, model, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer
        self.vocab = model.get_output_embeddings().weight.shape[0]

    @classmethod
    def open(cls, spec: str, *, device=None, dtype: str = "float32", tokenizer=None, **_):
        return cls(load_model(spec, dtype=dtype, device=None if device is None else str(device)), tokenizer)

    @torch.no_grad()
    def logits(self, batch: dict, mask: torch.Tensor, whole: bool) -> torch.Tensor:
        return forward_logits(self.model, batch)[:, :-1] if whole else selected_logits(self.model, batch, mask)

    @torch.no_grad()
    def token_logprobs(self, rows, batch: dict) -> torch.Tensor:
        """``log softmax(logits)[x_t]`` of each trained token ``x_t`` over the whole vocabulary, ``[N]`` float32 (a
        gather of its logits at the trained positions, as a server computes it)."""
        mask = batch["loss_mask"][:, 1:]
        logits = selected_logits(self.model, batch, mask).float()
        return torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:][mask.bool()][:, None])[:, 0]

    @torch.no_grad()
    def hidden(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_hidden(self.model, batch)

    @property
    def transform(self):
        return head_transform(self.model)

    def layer_shape(self) -> tuple[int, int]:
        """``(decoder blocks, hidden width)``."""
        return model_layout(self.model)

    @torch.no_grad()
    def layer_states(self, batch: dict, layers) -> list[torch.Tensor]:
        """The outputs ``[B, T, H]`` of ``layers`` on ``batch``, from one forward of their own."""
        caught = recorded_forward(self.model, batch, layers)
        return [caught[n] for n in layers]

    def record_layers(self, layers):
        """A context in which every forward of the model (``logits``, ``hidden``) records ``layers``."""
        return recording(self.model, layers)
