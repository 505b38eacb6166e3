"""``lmdistill train``: distill a teacher into a student with any recipe, on one process or many (accelerate).

The loop, per optimiser step: take the step's global batch (fixed by seed and step), keep this process's rows,
let the recipe's sequence source build the distilled sequences, count loss tokens across processes, then run
forward and backward per micro-batch with every objective term weighted by its share of its token set's global
count, so one process and N processes optimise the same objective. Non-finite losses skip the step; checkpoints
restore exactly. The trainer knows no method by name: the policy is a sequence source (``sequences.py``), the loss
an objective of registered terms (``lmdistill.losses.objective``).

Callbacks (``train(cfg, callbacks=[...])``) see ``on_step_begin(run, step)``, ``on_sequences(run, step, seqs)`` for
each micro-batch's sequences and ``on_step_end(run, step, metrics)``.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.io import atomic_dir, write_json
from lmdistill.losses.model_forward import shifted
from lmdistill.losses.objective import Objective
from lmdistill.losses.term import TermInputs
from lmdistill.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lmdistill.train.config import TrainConfig
from lmdistill.train.data_order import global_batch_indices, rank_slice
from lmdistill.train.metrics_log import MetricsLog, plot_curves
from lmdistill.train.sources import make_sequence_source
from lmdistill.train.setup import (load_rows, load_student, load_teacher, load_tokenizers, make_accelerator,
                                   make_optimizer, make_scheduler)
from lmdistill.train.validation import validate


class TrainingError(LmdistillError):
    """Training stopped (repeated non-finite losses, ...)."""


class Callback:
    """Hooks into the loop; override what you need (``bench/train.py`` times steps with them)."""

    def on_step_begin(self, run: "Run", step: int) -> None: ...

    def on_sequences(self, run: "Run", step: int, seqs) -> None: ...

    def on_step_end(self, run: "Run", step: int, metrics: dict) -> None: ...


class Run:
    """State of one training run (models, objective, optimiser, data, sequence source); ``train()`` drives it."""

    def __init__(self, cfg: TrainConfig, resume: bool | str = False, callbacks=()):
        self.cfg, self.out, self.callbacks = cfg, Path(cfg.output_dir), list(callbacks)
        self.acc = make_accelerator(cfg)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizers(cfg)
        self.train_rows, self.valid_rows, self.filter_reports = load_rows(cfg, self.tokenizer)
        device = self.acc.device
        student = load_student(cfg, device)
        self.teacher = load_teacher(cfg, device)
        self.objective = Objective(cfg.objective).to(device)   # after the models: its parameters draw random numbers
        self.whole_logits = self.objective.whole_logits(student)
        self.sampling = cfg.sampling_config(cfg.seed)   # what the terms may read of how sequences are drawn
        optimizer = make_optimizer(cfg, self.params(student))
        self.scheduler = make_scheduler(cfg, optimizer)
        self.student, self.optimizer = self.acc.prepare(student, optimizer)
        self.source = make_sequence_source(cfg)
        self.state = {"step": 0, "bad_steps": 0, "skipped_steps": 0, "best_rouge": None, "best_step": None,
                      "sequences": None, "tokens_seen": 0}
        self.ckpt_root = self.out / "checkpoints"
        self.resumed_from = self.restore(resume) if resume else None

    def restore(self, resume: bool | str) -> str:
        path = latest_checkpoint(self.ckpt_root) if resume is True else Path(resume)
        if path is None:
            raise ConfigError(f"--resume: no checkpoint in {self.ckpt_root}")
        self.state = load_checkpoint(path, self.modules(), self.optimizer, self.scheduler, self.rank)
        self.source.load_state(self.state.get("sequences"))
        return str(path)

    def modules(self) -> dict:
        return {"student": self.unwrapped(), "objective": self.objective}

    def unwrapped(self):
        return self.acc.unwrap_model(self.student)

    def params(self, student=None) -> list[torch.nn.Parameter]:
        student = self.student if student is None else student
        return [p for p in student.parameters() if p.requires_grad] + list(self.objective.parameters())

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(x.detach().clone(), reduction="sum") if self.world > 1 else x.detach()

    def hook(self, name: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(self, *args)

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict:
        cfg, acc = self.cfg, self.acc
        self.hook("on_step_begin", step)
        idx = global_batch_indices(step, cfg.batch_size, len(self.train_rows), cfg.seed)
        mine = [self.train_rows[i] for i in rank_slice(idx, self.rank, self.world)]
        micros = [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
        prepared = []
        for m, rows in enumerate(micros):
            seqs = self.source.build(rows, step=step, micro=m, rank=self.rank, student=self.unwrapped(),
                                     teacher=self.teacher, tokenizer=self.tokenizer)
            gold = seqs if seqs.is_gold else self.source.gold(rows, self.tokenizer)  # one collated batch serves both
            prepared.append((gold, seqs))
            self.hook("on_sequences", step, seqs)
        # global token counts per token set, so every micro-batch and process is weighted by its tokens
        counts = {"gold": sum(shifted(g.batch)[1].sum() for g, _ in prepared),
                  "sequences": sum(shifted(s.batch)[1].sum() for _, s in prepared), "batch": len(prepared)}
        totals = {k: self.all_sum(torch.as_tensor(v, dtype=torch.float32, device=acc.device)).clamp(min=1)
                  for k, v in counts.items()}
        weights = self.objective.weights
        logged = {k: 0.0 for k in weights}
        total_loss = torch.zeros((), device=acc.device)
        for m, (gold, seqs) in enumerate(prepared):
            inputs = TermInputs(self.student, self.teacher, {k: v.to(acc.device) for k, v in gold.batch.items()},
                                {k: v.to(acc.device) for k, v in seqs.batch.items()}, same=seqs.is_gold,
                                whole=self.whole_logits, rows=seqs.rows, tokenizer=self.tokenizer,
                                sampling=self.sampling)
            ctx = acc.no_sync(self.student) if m < len(prepared) - 1 else nullcontext()
            with ctx, acc.autocast():
                loss = torch.zeros((), device=acc.device)
                for name, (mean, tokens) in self.objective(inputs, chunked=cfg.chunked_loss).items():
                    part = mean * inputs.token_count(tokens) / totals[tokens]
                    loss = loss + weights[name] * part * self.world
                    logged[name] += float(part.detach())
                acc.backward(loss)
            total_loss += loss.detach() / self.world
        if not self.all_sum(torch.isfinite(total_loss).float()) >= self.world:
            self.optimizer.zero_grad(set_to_none=True)
            self.state["bad_steps"] += 1
            self.state["skipped_steps"] += 1
            return {"loss": float("nan"), "skipped": 1}
        self.state["bad_steps"] = 0
        grad_norm = acc.clip_grad_norm_(self.params(), cfg.clip_grad) if cfg.clip_grad > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # throughput counts the distilled sequences' tokens, or the gold ones when only gold-token terms train
        tokens = float(totals["sequences"] if "sequences" in self.objective.token_sets else totals["gold"])
        self.state["tokens_seen"] += tokens
        metrics = {"loss": float(self.all_sum(total_loss)), "lr": self.scheduler.get_last_lr()[0], "tokens": tokens}
        metrics.update({f"loss/{k}": float(self.all_sum(torch.tensor(v))) for k, v in logged.items()})
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        for _, s in prepared:
            for k, v in s.stats.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(prepared)
        return metrics

    def validate(self, step: int) -> dict:
        metrics = validate(self.unwrapped(), self.tokenizer, self.valid_rows, batch_size=self.cfg.micro_batch_size,
                           max_new_tokens=self.cfg.eval_max_new_tokens, seed=self.cfg.seed, template=self.cfg.template)
        self.source.observe_validation(metrics)
        return metrics

    # ------------------------------------------------------------------ export
    def export(self, name: str) -> Path:
        path = self.out / name
        if self.rank != 0:
            return path
        model = self.unwrapped()
        if self.cfg.lora:
            model = copy.deepcopy(model).merge_and_unload()
        with atomic_dir(path) as tmp:
            model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
        return path

    def save(self, step: int) -> Path:
        self.state["sequences"] = self.source.state()
        return save_checkpoint(self.ckpt_root, step, self.modules(), self.optimizer, self.scheduler, self.state,
                               keep=self.cfg.keep_checkpoints, rank=self.rank, world=self.world)


def train(cfg: TrainConfig, resume: bool | str = False, callbacks=()) -> dict:
    """Run (or resume) training; returns the final state with the paths of the exported models."""
    run = Run(cfg, resume, callbacks)
    main = run.rank == 0
    start = run.state["step"]
    log = MetricsLog(run.out, enabled=main, truncate_after=start if resume else 0)
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
        write_json(run.out / "config.json", {**cfg.__dict__, "filters": run.filter_reports, "world_size": run.world})
        for r in run.filter_reports:
            print(f"[lmdistill] {r}")
        if run.resumed_from:
            print(f"[lmdistill] resumed from {run.resumed_from} at step {start}")
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (main and cfg.progress), desc=f"train {cfg.method}",
               dynamic_ncols=True)
    t0, tokens0 = time.time(), run.state["tokens_seen"]
    step = start
    if start == 0 and run.source.needs_initial_validation and run.valid_rows:
        log.write(0, run.validate(0))   # the source's reference point (e.g. DistiLLM's step-0 validation loss)
    while step < cfg.max_steps:
        metrics = run.step(step)
        if metrics.get("skipped"):
            if run.state["bad_steps"] >= cfg.max_bad_steps:
                last = latest_checkpoint(run.ckpt_root)
                raise TrainingError(f"stopped at step {step}: {run.state['bad_steps']} non-finite losses in a row "
                                    f"(lower lr, check data); last good checkpoint: {last or 'none'}")
            log.write(step + 1, {"skipped": 1, "skipped_total": run.state["skipped_steps"]})
            run.hook("on_step_end", step, metrics)
            continue
        run.hook("on_step_end", step, metrics)
        step += 1
        run.state["step"] = step
        metrics["tokens_per_s"] = (run.state["tokens_seen"] - tokens0) / max(time.time() - t0, 1e-9)
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
        result["curves"] = str(plot_curves(run.out / "metrics.jsonl", run.out / "curves.png"))
        write_json(run.out / "result.json", result)
    run.acc.wait_for_everyone()
    return result
