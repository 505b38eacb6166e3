"""A causal LM's output logits exactly as its own ``forward`` computes them from the LM head's output.

Some architectures change the logits after ``lm_head(h)`` inside ``forward`` (transformers 5.25.0):

- Gemma-2, Gemma-3 (text), Gemma-4 (text), VaultGemma, NanoChat: ``z <- cap * tanh(z / cap)``,
  ``cap = config.final_logit_softcapping`` (off when ``None``); e.g. ``Gemma2ForCausalLM.forward``,
  ``transformers/models/gemma2/modeling_gemma2.py:519-523`` (divide, ``tanh``, multiply, in that order);
- Cohere, Cohere2, Cohere2-MoE: ``z <- z * config.logit_scale`` (``models/cohere/modeling_cohere.py:497-498``);
- Granite, GraniteMoe, GraniteMoeShared, GraniteSWA, GraniteMoeSWA: ``z <- z / config.logits_scaling``
  (``models/granite/modeling_granite.py:488-489``);
- HyperCLOVAX: ``z <- z * config.logits_scaling``; Falcon-H1: ``z <- z * config.lm_head_multiplier``.

``model(...).logits`` already is the forward's own. Every path that applies the LM head to hidden states itself
(logits at selected positions, the chunked losses, the fast decoder) must apply the same steps, or it scores a
different distribution: with Gemma-2's cap of 30, raw ``h @ W.T`` logits are not even bounded. TRL's chunked
distillation loss applies the cap and the scale in each chunk, and its trainer refuses Liger's fused loss, which
cannot, for such models (huggingface/trl#6629).

Which architectures are *known*: :data:`POSTPROCESSING` maps ``config.model_type`` to its steps (an empty tuple:
the logits are the LM head's output). A model type not in it (a new architecture, a multimodal wrapper, a model
with ``trust_remote_code``, a module without a config) is *unknown*: :func:`logit_transform` gives ``None``, paths
that can run the full forward use it, and paths that cannot apply the steps refuse it by name
(:func:`require_logit_transform`). tests/test_model_logits.py checks every entry of the table against the installed
transformers (a tiny random model of each type, its head scaled so the steps matter: forward logits equal the
table's steps on the decoder's hidden states). At run time ``model_forward`` also compares the forward's own logits
at the last position (which it computes anyway) with the table's steps on the same hidden state and refuses a model
where they differ (a patched forward, remote code reusing a known ``model_type``, another transformers version).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmdistill.errors import ConfigError

#: ``model_type -> ((step, config field), ...)`` in the forward's order; ``step`` is ``softcap`` (``cap * tanh(z /
#: cap)``), ``mul`` or ``div``. A field whose value is ``None`` is a step the forward skips.
POSTPROCESSING: dict[str, tuple[tuple[str, str], ...]] = {
    **{t: () for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi",
                       "phi3", "olmo", "olmo2", "smollm3", "starcoder2", "stablelm", "gpt2", "gpt_neox", "opt")},
    **{t: (("softcap", "final_logit_softcapping"),)
       for t in ("gemma2", "gemma3_text", "gemma4_text", "vaultgemma", "nanochat")},
    **{t: (("mul", "logit_scale"),) for t in ("cohere", "cohere2", "cohere2_moe")},
    **{t: (("div", "logits_scaling"),)
       for t in ("granite", "granitemoe", "granitemoeshared", "granite_swa", "granitemoe_swa")},
    "hyperclovax": (("mul", "logits_scaling"),),
    "falcon_h1": (("mul", "lm_head_multiplier"),),
}

#: Config fields that post-process logits in some architecture: named in the refusal of an unknown model type.
SUSPECT_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                  "output_multiplier_scale", "logit_softcapping", "logits_scale")


@dataclass(frozen=True)
class LogitTransform:
    """The steps a model's forward applies to ``z = lm_head(h)``: ``(step, field, value)`` in order."""

    model_type: str
    steps: tuple[tuple[str, str, float], ...] = ()

    @property
    def identity(self) -> bool:
        return not self.steps

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The forward's logits from the head's output ``z`` (out of place, differentiable, same operation order
        and dtype as the forward, so the same values); ``z`` itself when there are no steps."""
        for step, _, v in self.steps:
            if step == "softcap":
                z = torch.tanh(z / v) * v
            elif step == "mul":
                z = z * v
            else:
                z = z / v
        return z

    def apply_(self, z: torch.Tensor, deriv: torch.Tensor | None = None) -> tuple[float, torch.Tensor | None]:
        """In place ``z <- f(z)``; returns ``f'(z)`` as ``(constant, tensor or None)``, their product.

        ``d/dz [c tanh(z / c)] = 1 - tanh(z / c)^2`` is written into ``deriv`` (a buffer shaped like ``z``; without
        one no derivative is kept, as for the teacher). ``mul``/``div`` contribute constants."""
        const, tensor = 1.0, None
        for step, field_, v in self.steps:
            if step == "softcap":
                if deriv is None:
                    z.div_(v).tanh_().mul_(v)
                    continue
                if tensor is not None:
                    raise ValueError(f"{self.model_type}: two soft-caps ({field_}) are not supported")
                t = torch.div(z, v, out=deriv).tanh_()
                torch.mul(t, v, out=z)
                tensor = t.mul_(t).neg_().add_(1.0)
            elif step == "mul":
                z.mul_(v)
                const *= v
            else:
                z.div_(v)
                const /= v
        return const, tensor

    def describe(self) -> str:
        names = {"softcap": "{v} * tanh(z / {v})", "mul": "z * {v}", "div": "z / {v}"}
        return " then ".join(f"{names[s].format(v=v)} ({f})" for s, f, v in self.steps) or "none"


def base_model(model):
    """The causal LM inside a DDP/FSDP (``.module``) or peft wrapper."""
    inner = model.module if hasattr(model, "module") else model
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def model_type_of(model) -> str | None:
    return getattr(getattr(base_model(model), "config", None), "model_type", None)


def logit_transform(model) -> LogitTransform | None:
    """What ``model``'s forward does to ``lm_head(h)``, or ``None`` when its model type is unknown."""
    cfg = getattr(base_model(model), "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in POSTPROCESSING:
        return None
    steps = []
    for step, name in POSTPROCESSING[mt]:
        v = getattr(cfg, name, None)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v == 0 or v != v:
            raise ConfigError(f"model type {mt!r}: config.{name} = {v!r} is not a nonzero number")
        steps.append((step, name, float(v)))
    return LogitTransform(mt, tuple(steps))


def require_logit_transform(model, where: str) -> LogitTransform:
    """:func:`logit_transform`, or ``ConfigError`` naming the unknown model type (and any config field that looks
    like logit post-processing): ``where`` computes logits from hidden states and could not apply it."""
    t = logit_transform(model)
    if t is not None:
        return t
    cfg = getattr(base_model(model), "config", None)
    mt = getattr(cfg, "model_type", None)
    seen = [f"config.{f}={getattr(cfg, f)!r}" for f in SUSPECT_FIELDS if getattr(cfg, f, None) is not None]
    what = f"model type {mt!r} (config.model_type)" if mt else \
        f"{type(base_model(model)).__name__} (no config.model_type)"
    sets = "; its config sets " + ", ".join(seen) if seen else ""
    raise ConfigError(f"{where}: {what} is not in lmdistill's table of logit post-processing "
                      f"(losses/model_logits.py POSTPROCESSING){sets}: logits computed from its hidden states could "
                      "differ from its forward's, so this path refuses it (use the full forward: chunked_loss: false, "
                      "or the HF decoder)")


def head_logits(model, hidden: torch.Tensor, transform: LogitTransform | None = None) -> torch.Tensor:
    """The logits ``model``'s forward gives for final hidden states ``hidden``: its LM head, then its steps."""
    transform = transform or require_logit_transform(model, "logits from hidden states")
    return transform(base_model(model).get_output_embeddings()(hidden))
