"""Where the distilled sequences come from: the recipe's ``policy`` turned into a training batch.

``gold`` uses the dataset's responses; ``student``, ``teacher``, ``mixed``, ``switch``, ``scrg`` and
``teacher_mix`` call the sequence engine; ``replay`` is DistiLLM's adaptive off-policy scheme. Every sequence
becomes a right-padded batch (``collate_for_training``), so the objective sees one format.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lmdistill.data.collate import collate_for_training
from lmdistill.data.tokenize import TokenizedExample
from lmdistill.train.data_order import step_seed


@dataclass
class SequenceBatch:
    batch: dict                       # collate_for_training output
    rows: list[TokenizedExample]
    stats: dict = field(default_factory=dict)


def sampling_config(cfg, seed: int):
    from lmdistill.generation import SamplingConfig

    return SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.gen_temperature, top_k=cfg.gen_top_k,
                          top_p=cfg.gen_top_p, seed=seed, do_sample=True, mix_lambda=cfg.mix_lambda, tau0=cfg.tau0,
                          lam=cfg.lam, n_corrections=cfg.n_corrections, mix_alpha=cfg.teacher_mix_alpha,
                          decoder=cfg.gen_decoder)


def generate_rows(policy: str, rows: list[TokenizedExample], student, teacher, tokenizer, cfg, seed: int):
    """Run the engine on the prompts of ``rows``; return new rows with generated responses and stats."""
    from lmdistill.generation import generate

    out = generate(student, [r.prompt_ids for r in rows], policy=policy, teacher=teacher,
                   gold=[r.response_ids for r in rows], config=sampling_config(cfg, seed),
                   pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    new_rows = []
    for r, resp, st in zip(rows, out.responses, out.stats):
        if st.get("origin") == "gold":   # off-policy rows train on the whole gold response, not its first N tokens
            resp = r.response_ids
        resp = list(resp) or [tokenizer.eos_token_id]   # an empty sample still trains on EOS
        new_rows.append(TokenizedExample(r.id, r.prompt_ids, resp, r.example))
    return new_rows, summarise_stats(out.stats)


def summarise_stats(stats: list[dict]) -> dict:
    """Mean of the numeric per-sequence statistics (teacher-token fraction, correction position, ...)."""
    sums: dict[str, list[float]] = {}
    for s in stats:
        for k, v in s.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sums.setdefault(k, []).append(float(v))
            elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v) and k != "jsd_trace":
                sums.setdefault(k, []).append(float(sum(v)) / len(v))
    return {f"gen/{k}": sum(v) / len(v) for k, v in sums.items()}


def build_sequences(rows: list[TokenizedExample], *, cfg, step: int, micro: int, rank: int, student, teacher,
                    tokenizer, replay=None) -> SequenceBatch:
    pad = tokenizer.pad_token_id
    policy = cfg.policy
    seed = step_seed(cfg.seed, step, rank, micro)
    if policy == "gold":
        return SequenceBatch(collate_for_training(rows, pad), rows)
    if policy == "replay":
        rng = random.Random(seed)
        action = replay.decide(step, cfg.max_steps, len(rows), rng)
        if action == "gold":
            return SequenceBatch(collate_for_training(rows, pad), rows, {"replay/sgo": 0.0})
        if action == "replay":
            items = replay.sample(len(rows), rng)
            new = [TokenizedExample(f"replay-{i}", it["prompt_ids"], it["response_ids"]) for i, it in enumerate(items)]
            return SequenceBatch(collate_for_training(new, pad), new, {"replay/sgo": 1.0, "replay/fresh": 0.0})
        new, stats = generate_rows("student", rows, student, teacher, tokenizer, cfg, seed)
        replay.push([{"prompt_ids": r.prompt_ids, "response_ids": r.response_ids} for r in new])
        return SequenceBatch(collate_for_training(new, pad), new, {**stats, "replay/sgo": 1.0, "replay/fresh": 1.0})
    new, stats = generate_rows(policy, rows, student, teacher, tokenizer, cfg, seed)
    return SequenceBatch(collate_for_training(new, pad), new, stats)
