"""``lmdistill train``: distill a teacher into a student with any recipe, on one process or many (accelerate).

The loop, per optimiser step: take the step's global batch (fixed by seed and step), keep this process's rows,
build the distilled sequences with the recipe's policy, count loss tokens across processes, then run forward and
backward per micro-batch with every term weighted by its share of the global token count, so one process and N
processes optimise the same objective. Non-finite losses skip the step; checkpoints restore exactly.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

from lmdistill.data.collate import collate_for_training
from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lmdistill.train.config import TrainConfig
from lmdistill.train.data_order import global_batch_indices, rank_slice, step_seed
from lmdistill.train.objective import compute_terms, forward_logits, shifted
from lmdistill.train.replay import ReplayBuffer
from lmdistill.train.sequences import build_sequences


class TrainingError(LmdistillError):
    """Training stopped (repeated non-finite losses, ...)."""


def check_tokenizers(student_tok, teacher_tok) -> None:
    """Refuse tokenizers that disagree on more than padding: the shared id range must map to the same tokens."""
    sv = {i: t for t, i in student_tok.get_vocab().items()}
    tv = {i: t for t, i in teacher_tok.get_vocab().items()}
    for i in range(min(len(sv), len(tv))):
        if sv.get(i) != tv.get(i):
            raise ConfigError(f"teacher and student tokenizers differ at id {i}: student {sv.get(i)!r}, "
                              f"teacher {tv.get(i)!r}; distillation needs a shared tokenizer")
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(student_tok, name) != getattr(teacher_tok, name):
            raise ConfigError(f"teacher and student tokenizers have different {name}")


def cosine_or_linear(cfg: TrainConfig, optimizer):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * cfg.max_steps)
    return get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=warmup, num_training_steps=cfg.max_steps)


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


class Run:
    """State of one training run (models, optimiser, data); ``train()`` drives it."""

    def __init__(self, cfg: TrainConfig, resume: bool | str = False):
        from accelerate import Accelerator

        from lmdistill.data import load_examples, tokenize_examples
        from lmdistill.models import load_model, load_tokenizer

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        use_bf16 = cfg.mixed_precision == "bf16" or (
            cfg.mixed_precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        # without CUDA, `accelerate launch --multi_gpu --num_processes N` runs N CPU processes over gloo
        cpu = cfg.device == "cpu" or not torch.cuda.is_available()
        self.acc = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=cpu)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch_size ({cfg.batch_size}) must split evenly over {self.world} processes")
        torch.manual_seed(cfg.seed)

        self.tokenizer = load_tokenizer(cfg.student)
        if cfg.teacher:
            check_tokenizers(self.tokenizer, load_tokenizer(cfg.teacher))
        train = load_examples(cfg.data)
        valid = load_examples(cfg.valid_data) if cfg.valid_data else None
        examples = train.examples[: cfg.max_train_examples or None]
        self.train_rows, reports = tokenize_examples(examples, self.tokenizer, template=cfg.template,
                                                     max_prompt_length=cfg.max_prompt_length, max_length=cfg.max_length)
        self.filter_reports = [str(r) for r in reports]
        if not self.train_rows:
            raise ConfigError(f"data: no training rows left after filtering ({'; '.join(self.filter_reports)})")
        self.valid_rows = []
        if valid is not None:
            self.valid_rows, _ = tokenize_examples(valid.examples[: max(cfg.eval_limit, 1)], self.tokenizer,
                                                   template=cfg.template, max_prompt_length=cfg.max_prompt_length,
                                                   max_length=cfg.max_length)

        device = self.acc.device
        student = load_model(cfg.student, dtype=cfg.student_dtype, device=str(device), trainable=True)
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            student = get_peft_model(student, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                         lora_dropout=cfg.lora_dropout,
                                                         target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM"))
        student.train()
        self.teacher = load_model(cfg.teacher, dtype=cfg.teacher_dtype, device=str(device)) if cfg.teacher else None
        self.dac = None
        if cfg.loss == "dac_kl":
            from lmdistill.losses.dac_kl import DACKL

            self.dac = DACKL(**{"temperature": cfg.temperature, **cfg.dac_kl}).to(device)
        params = [p for p in student.parameters() if p.requires_grad]
        if self.dac is not None:
            params += list(self.dac.parameters())
        optimizer = make_optimizer(cfg, params)
        scheduler = cosine_or_linear(cfg, optimizer)
        self.student, self.optimizer = self.acc.prepare(student, optimizer)
        self.scheduler = scheduler
        self.replay = ReplayBuffer(cfg.replay_capacity, cfg.replay_init_threshold) if cfg.policy == "replay" else None
        self.state = {"step": 0, "bad_steps": 0, "skipped_steps": 0, "best_rouge": None, "best_step": None,
                      "replay": None, "tokens_seen": 0}
        self.ckpt_root = self.out / "checkpoints"
        if resume:
            path = latest_checkpoint(self.ckpt_root) if resume is True else Path(resume)
            if path is None:
                raise ConfigError(f"--resume: no checkpoint in {self.ckpt_root}")
            self.state = load_checkpoint(path, self.modules(), self.optimizer, self.scheduler, self.rank)
            if self.replay is not None and self.state.get("replay"):
                self.replay = ReplayBuffer.from_state(self.state["replay"])
            self.resumed_from = str(path)
        else:
            self.resumed_from = None

    # ------------------------------------------------------------------ helpers
    def modules(self) -> dict:
        return {"student": self.acc.unwrap_model(self.student), "dac_kl": self.dac}

    def unwrapped(self):
        return self.acc.unwrap_model(self.student)

    def span_ids(self, rows) -> torch.Tensor | None:
        if self.cfg.span_weight <= 0:
            return None
        from lmdistill.losses.span_correlation import batch_span_ids

        # logits position len(prompt) - 1 + i predicts response token i; the objective drops the last position
        width = max(len(r.input_ids) for r in rows)
        return batch_span_ids([r.response_ids for r in rows], self.tokenizer, width - 1,
                              [len(r.prompt_ids) - 1 for r in rows], self.cfg.span_prior).to(self.acc.device)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(x.detach().clone(), reduction="sum") if self.world > 1 else x.detach()

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict:
        cfg, acc = self.cfg, self.acc
        idx = global_batch_indices(step, cfg.batch_size, len(self.train_rows), cfg.seed)
        mine = [self.train_rows[i] for i in rank_slice(idx, self.rank, self.world)]
        micros = [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
        prepared, gen_stats = [], []
        for m, rows in enumerate(micros):
            seqs = build_sequences(rows, cfg=cfg, step=step, micro=m, rank=self.rank, student=self.unwrapped(),
                                   teacher=self.teacher, tokenizer=self.tokenizer, replay=self.replay)
            same = seqs.rows is rows   # the policy kept the gold rows: one collated batch serves both
            gold = seqs.batch if same else collate_for_training(rows, self.tokenizer.pad_token_id)
            prepared.append((gold, seqs, same))
            gen_stats.append(seqs.stats)
        # global token counts per term, so every micro-batch and process is weighted by its tokens
        counts = {"sft": sum(shifted(g)[1].sum() for g, _, _ in prepared),
                  "seq": sum(shifted(s.batch)[1].sum() for _, s, _ in prepared)}
        totals = {k: self.all_sum(torch.as_tensor(v, dtype=torch.float32, device=acc.device)).clamp(min=1)
                  for k, v in counts.items()}
        weights = {"sft": cfg.sft_weight, "seq_sft": cfg.seq_sft_weight, "kd": cfg.kd_weight, "span": cfg.span_weight}
        logged = {k: 0.0 for k in weights}
        total_loss = torch.zeros((), device=acc.device)
        for m, (gold, seqs, same) in enumerate(prepared):
            gold = {k: v.to(acc.device) for k, v in gold.items()}
            seq = {k: v.to(acc.device) for k, v in seqs.batch.items()}
            ctx = acc.no_sync(self.student) if m < len(prepared) - 1 else nullcontext()
            with ctx, acc.autocast():
                terms = compute_terms(cfg, self.student, self.teacher, gold, seq, same=same, dac=self.dac,
                                      span_ids=self.span_ids(seqs.rows))
                loss = torch.zeros((), device=acc.device)
                for name, (mean, count) in terms.items():
                    total = totals["sft" if name == "sft" else "seq"]
                    part = mean * count / total
                    loss = loss + weights[name] * part * self.world
                    logged[name] += float(part.detach())
                acc.backward(loss)
            total_loss += loss.detach() / self.world
        finite = torch.isfinite(total_loss).float()
        finite = self.all_sum(finite) >= self.world
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.state["bad_steps"] += 1
            self.state["skipped_steps"] += 1
            return {"loss": float("nan"), "skipped": 1}
        self.state["bad_steps"] = 0
        grad_norm = acc.clip_grad_norm_(self._params(), cfg.clip_grad) if cfg.clip_grad > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # throughput counts the distilled sequences' tokens, or the gold ones when only SFT trains
        tokens = float(totals["seq"] if cfg.kd_weight or cfg.seq_sft_weight or cfg.span_weight else totals["sft"])
        self.state["tokens_seen"] += tokens
        metrics = {"loss": float(self.all_sum(total_loss)), "lr": self.scheduler.get_last_lr()[0], "tokens": tokens}
        metrics.update({f"loss/{k}": float(self.all_sum(torch.tensor(v))) for k, v in logged.items()
                        if weights[k] > 0})
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        for s in gen_stats:
            for k, v in s.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(gen_stats)
        return metrics

    def _params(self):
        ps = [p for p in self.student.parameters() if p.requires_grad]
        return ps + (list(self.dac.parameters()) if self.dac is not None else [])

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, step: int) -> dict:
        cfg = self.cfg
        rows = self.valid_rows
        if not rows:
            return {}
        from lmdistill.evaluate.metrics import rouge_l_corpus
        from lmdistill.generation import SamplingConfig, generate

        model = self.unwrapped()
        model.eval()
        from lmdistill.losses import sft_loss

        total, count = 0.0, 0.0
        for i in range(0, len(rows), cfg.micro_batch_size):
            b = {k: v.to(self.acc.device) for k, v in
                 collate_for_training(rows[i:i + cfg.micro_batch_size], self.tokenizer.pad_token_id).items()}
            labels, mask = shifted(b)
            n = float(mask.sum())
            total += float(sft_loss(forward_logits(model, b)[:, :-1], labels, mask)) * n
            count += n
        preds = []
        for i in range(0, len(rows), cfg.micro_batch_size):
            chunk = rows[i:i + cfg.micro_batch_size]
            out = generate(model, [r.prompt_ids for r in chunk], policy="student",
                           config=SamplingConfig(max_new_tokens=cfg.eval_max_new_tokens, temperature=1.0, top_k=0,
                                                 top_p=1.0, seed=step_seed(cfg.seed, 10**6 + i), do_sample=True),
                           pad_id=self.tokenizer.pad_token_id, eos_id=self.tokenizer.eos_token_id)
            preds += [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in out.responses]
        model.train()
        rouge = rouge_l_corpus(preds, [r.example.references for r in rows])
        val_loss = total / max(count, 1.0)
        if self.replay is not None:
            self.replay.observe_val_loss(val_loss, cfg.replay_threshold_step, cfg.replay_loss_eps)
        return {"val/loss": val_loss, "val/rougeL": rouge}

    # ------------------------------------------------------------------ export
    def export(self, name: str) -> Path:
        path = self.out / name
        if self.rank != 0:
            return path
        model = self.unwrapped()
        if self.cfg.lora:
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        from lmdistill.io import atomic_dir

        with atomic_dir(path) as tmp:
            model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
        return path

    def save(self, step: int) -> Path:
        if self.replay is not None:
            self.state["replay"] = self.replay.state()
        return save_checkpoint(self.ckpt_root, step, self.modules(), self.optimizer, self.scheduler, self.state,
                               keep=self.cfg.keep_checkpoints, rank=self.rank, world=self.world)


def train(cfg: TrainConfig, resume: bool | str = False) -> dict:
    """Run (or resume) training; returns the final state with the paths of the exported models."""
    from tqdm.auto import tqdm

    from lmdistill.train.metrics_log import MetricsLog

    run = Run(cfg, resume)
    main = run.rank == 0
    start = run.state["step"]
    log = MetricsLog(run.out, enabled=main, truncate_after=start if resume else 0)
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
        from lmdistill.io import write_json

        write_json(run.out / "config.json", {**cfg.__dict__, "filters": run.filter_reports,
                                             "world_size": run.world})
        for r in run.filter_reports:
            print(f"[lmdistill] {r}")
        if run.resumed_from:
            print(f"[lmdistill] resumed from {run.resumed_from} at step {start}")
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (main and cfg.progress), desc=f"train {cfg.method}",
               dynamic_ncols=True)
    t0, tokens0 = time.time(), run.state["tokens_seen"]
    step = start
    while step < cfg.max_steps:
        metrics = run.step(step)
        if metrics.get("skipped"):
            if run.state["bad_steps"] >= cfg.max_bad_steps:
                last = latest_checkpoint(run.ckpt_root)
                raise TrainingError(f"stopped at step {step}: {run.state['bad_steps']} non-finite losses in a row "
                                    f"(lower lr, check data); last good checkpoint: {last or 'none'}")
            log.write(step + 1, {"skipped": 1, "skipped_total": run.state["skipped_steps"]})
            continue
        step += 1
        run.state["step"] = step
        elapsed = max(time.time() - t0, 1e-9)
        metrics["tokens_per_s"] = (run.state["tokens_seen"] - tokens0) / elapsed
        if step % cfg.eval_steps == 0 or step == cfg.max_steps:
            val = run.validate(step)
            metrics.update(val)
            rouge = val.get("val/rougeL")
            if rouge is not None and (run.state["best_rouge"] is None or rouge > run.state["best_rouge"]):
                run.state["best_rouge"], run.state["best_step"] = rouge, step
                run.export("best")
        if step % cfg.log_steps == 0 or step == cfg.max_steps:
            log.write(step, metrics)
        if step % cfg.save_steps == 0 or step == cfg.max_steps:
            run.save(step)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
    bar.close()
    final = run.export("final")
    log.close()
    result = {"final": str(final), "best": str(run.out / "best") if run.state["best_step"] else None,
              "best_step": run.state["best_step"], "best_rougeL": run.state["best_rouge"],
              "skipped_steps": run.state["skipped_steps"], "steps": step}
    if main:
        from lmdistill.io import write_json
        from lmdistill.train.metrics_log import plot_curves

        result["curves"] = str(plot_curves(run.out / "metrics.jsonl", run.out / "curves.png"))
        write_json(run.out / "result.json", result)
    run.acc.wait_for_everyone()
    return result
