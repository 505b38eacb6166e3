"""The training objective of one micro-batch, composed from recipe keys.

``L = sft_weight * SFT(gold) + seq_sft_weight * SFT(sequences) + kd_weight * D(student, teacher | sequences)
+ span_weight * Span(sequences)``

``D`` is the recipe's ``loss``: a token-level divergence from ``lmdistill.losses`` (``fkl``, ``jsd``, ``skl``,
...), MGSR's ``dac_kl`` module, or MiniLLM's ``pg_rkl`` policy gradient. Each term is returned as
``(masked mean, token count)`` so the trainer can weight it by tokens across micro-batches and processes.
"""

from __future__ import annotations

import torch

from lmdistill.train.minillm import policy_gradient_rkl


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Logits at every position; position ids follow the attention mask, so padding never shifts them."""
    attn = batch["attention_mask"]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=batch["input_ids"], attention_mask=attn, position_ids=pos).logits


def forward_hidden(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Final (normed) hidden states ``[B, T, H]`` and the LM-head weight ``[V, H]``, without the ``[B, T, V]`` logits.

    The model (DDP wrapper included, so gradients still synchronise) runs with ``logits_to_keep=1``; a forward
    hook on its decoder catches ``last_hidden_state``. Works for every HF causal LM with ``get_decoder()``.
    """
    inner = model.module if hasattr(model, "module") else model
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    caught = {}

    def hook(_module, _inputs, output):
        caught["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = inner.get_decoder().register_forward_hook(hook)
    try:
        attn = batch["attention_mask"]
        model(input_ids=batch["input_ids"], attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
              logits_to_keep=1)
    finally:
        handle.remove()
    return caught["h"], inner.get_output_embeddings().weight


def chunked_terms(cfg, student, teacher, gold: dict, seq: dict, *, same: bool) -> dict:
    """The same terms as ``compute_terms`` through ``lmdistill.losses.chunked_divergence``: no more than one chunk
    of vocabulary-sized tensors is alive at a time (real 128k-152k vocabularies)."""
    from lmdistill.losses import chunked_divergence

    terms = {}
    gold_h = None
    if cfg.sft_weight > 0 or same:
        gold_h, w = forward_hidden(student, gold)
    if cfg.sft_weight > 0:
        labels, mask = shifted(gold)
        terms["sft"] = (chunked_divergence("sft", gold_h[:, :-1], w, labels=labels, mask=mask), mask.sum())
    if cfg.kd_weight <= 0 and cfg.seq_sft_weight <= 0:
        return terms
    s_h, w = (gold_h, w) if same else forward_hidden(student, seq)
    targets, mask = shifted(seq)
    count = mask.sum()
    if cfg.seq_sft_weight > 0:
        terms["seq_sft"] = (chunked_divergence("sft", s_h[:, :-1], w, labels=targets, mask=mask), count)
    if cfg.kd_weight > 0:
        with torch.no_grad():
            t_h, t_w = forward_hidden(teacher, seq)
        terms["kd"] = (chunked_divergence(cfg.loss, s_h[:, :-1], w, teacher_hidden=t_h[:, :-1].to(s_h.dtype),
                                          teacher_head_weight=t_w.to(w.dtype), mask=mask,
                                          temperature=cfg.temperature, **cfg.loss_params), count)
    return terms


def shifted(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and mask aligned with logits positions 0..T-2 (position t predicts token t+1)."""
    return batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].float()


def logit_postprocessing(model) -> bool:
    """True when the model changes its logits after the LM head (soft-capping, scaling): then only a full forward
    gives the right logits."""
    inner = model.module if hasattr(model, "module") else model
    cfg = getattr(inner, "config", None)
    return bool(getattr(cfg, "final_logit_softcapping", None)) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0)


def selected_logits(model, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, V]`` at the N trained positions only (mask over positions 0..T-2): the LM head never runs on
    prompt or padding positions. Same values as ``forward_logits(model, batch)[:, :-1][mask]``."""
    inner = model.module if hasattr(model, "module") else model
    h, _ = forward_hidden(model, batch)
    return inner.get_output_embeddings()(h[:, :-1][mask.bool()])


def compute_terms(cfg, student, teacher, gold: dict, seq: dict, *, same: bool, dac=None, span_ids=None
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Terms of the objective as ``name -> (mean over its tokens, number of tokens)``.

    ``same`` says the sequences are the gold batch itself (one student forward serves both terms). Losses that
    need whole sequences (MiniLLM's returns, MGSR's span pairs) get full ``[B, T, V]`` logits; the others get
    logits at trained positions only, which skips the LM head on prompt and padding positions.
    """
    from lmdistill.losses import get_loss, sft_loss

    if cfg.chunked_loss:
        return chunked_terms(cfg, student, teacher, gold, seq, same=same)
    whole = cfg.loss == "pg_rkl" or cfg.span_weight > 0 or logit_postprocessing(student)

    def logits(model, batch, mask):
        return forward_logits(model, batch)[:, :-1] if whole else selected_logits(model, batch, mask)

    def flat(x, mask):
        return x if whole else x[mask.bool()]

    terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    need_seq = cfg.kd_weight > 0 or cfg.span_weight > 0 or cfg.seq_sft_weight > 0
    need_teacher = cfg.kd_weight > 0 or cfg.span_weight > 0
    labels, gmask = shifted(gold)
    gold_logits = None
    if cfg.sft_weight > 0 or (need_seq and same):
        gold_logits = logits(student, gold, gmask)
    if cfg.sft_weight > 0:
        terms["sft"] = (sft_loss(gold_logits, flat(labels, gmask), gmask if whole else None), gmask.sum())
    if not need_seq:
        return terms
    targets, mask = shifted(seq)
    s = gold_logits if same else logits(student, seq, mask)
    count = mask.sum()
    m = mask if whole else None
    if cfg.seq_sft_weight > 0:
        terms["seq_sft"] = (sft_loss(s, flat(targets, mask), m), count)
    if not need_teacher:
        return terms
    with torch.no_grad():
        t = logits(teacher, seq, mask).to(s.dtype)
    if cfg.kd_weight > 0:
        if cfg.loss == "dac_kl":
            value = dac(s, t, m)
        elif cfg.loss == "pg_rkl":
            value = policy_gradient_rkl(s, t, targets, mask, alpha=cfg.teacher_mix_alpha, clip=cfg.pg_clip,
                                        length_norm=cfg.pg_length_norm, temperature=cfg.temperature)
        else:
            value = get_loss(cfg.loss, **cfg.loss_params)(s, t, m, temperature=cfg.temperature)
        terms["kd"] = (value, count)
    if cfg.span_weight > 0:
        from lmdistill.losses.span_correlation import span_correlation_loss

        terms["span"] = (span_correlation_loss(s, t, span_ids, mask, temperature=cfg.temperature), count)
    return terms
