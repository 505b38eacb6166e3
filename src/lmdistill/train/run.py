"""One training run's state and its optimiser step: models, teacher, objective, optimiser, sequence source and the
parallelism strategy (``parallel.py``). ``trainer.train`` drives it step by step.

A step, in named parts: :meth:`Run.build_sequences` (the step's global batch, fixed by seed and step; this
process's rows; the policy's sequences per micro-batch), :meth:`Run.token_totals` (each token set's global count),
:meth:`Run.forward_backward` (every term weighted by its share of its token set's count, so one process and N
processes optimise the same objective), :meth:`Run.update` (clip, optimiser and schedule; a non-finite loss skips
the step) and :meth:`Run.step_metrics`. It knows no method by name: the policy is a sequence source
(``sources.py``), the loss an objective of registered terms, the teacher a ``teachers.Teacher``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lmdistill.errors import Stopped
from lmdistill.io import atomic_dir
from lmdistill.losses.model_forward import shifted
from lmdistill.losses.objective import Objective
from lmdistill.losses.term import TermContext, TermInputs
from lmdistill.models.model_card import copy_license_files
from lmdistill.runtime import StopSignals
from lmdistill.train.checkpoint import resume_checkpoint, save_checkpoint
from lmdistill.train.config import TrainConfig, samples_teacher
from lmdistill.train.data_order import global_batch_indices
from lmdistill.train.ownership import fingerprint, run_identity
from lmdistill.train.parallel import make_strategy
from lmdistill.train.route_plan import add_part, loss_keys, micro_batches, reader, route_tokens
from lmdistill.train.setup import (load_rows, load_student, load_teacher, load_tokenizers, make_accelerator,
                                   make_optimizer, make_scheduler)
from lmdistill.train.sources import make_sequence_source, policy_class, policy_params
from lmdistill.train.validation import validate


class Run:
    """State of one training run; ``trainer.train()`` drives it."""

    def __init__(self, cfg: TrainConfig, resume: bool | str = False, callbacks=(), identity: dict | None = None):
        self.cfg, self.out, self.callbacks = cfg, Path(cfg.output_dir), list(callbacks)
        self.acc = make_accelerator(cfg)
        self.strategy = make_strategy(self.acc, cfg)
        self.rank, self.world = self.strategy.rank, self.strategy.world
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizers(cfg)
        self.train_rows, self.valid_rows, self.filter_reports = load_rows(cfg, self.tokenizer)
        device = self.acc.device
        student = load_student(cfg, device)
        self.teacher = load_teacher(cfg, device, self.tokenizer)   # a teachers.Teacher (model, cache, server) or None
        teacher_model = self.teacher.model if self.teacher is not None else None
        self.strategy.shard_models(student, self.teacher)
        # after the models: its parameters draw random numbers, and terms size them from the models (Term.bind)
        self.objective = Objective(cfg.objective, TermContext(student, self.teacher, cfg.student)).to(device)
        self.whole_logits = self.objective.whole_logits(student, *(self.teacher.models() if self.teacher else ()))
        self.sampling = cfg.sampling_config(cfg.seed)   # what the terms may read of how sequences are drawn
        optimizer = make_optimizer(cfg, self.params(student))
        self.scheduler = make_scheduler(cfg, optimizer)
        self.student, self.optimizer = self.strategy.prepare(student, self.teacher, optimizer)
        self.source = make_sequence_source(cfg)
        # what generation decodes with (gathered under FSDP2): the student when the policy writes sequences, and the
        # teacher's model when it samples from it
        writes = policy_class(cfg.policy).generator(policy_params(cfg.policy)) is not None
        self.generation_models = (student if writes else None, teacher_model if samples_teacher(cfg) else None)
        self.state = {"step": 0, "bad_steps": 0, "skipped_steps": 0, "best_rouge": None, "best_step": None,
                      "sequences": None, "tokens_seen": 0}
        self.ckpt_root = self.out / "checkpoints"
        self.resumed_from = self.restore(resume) if resume else None
        identity = run_identity(cfg) if identity is None else identity
        self.state["run"] = {"fingerprint": fingerprint(identity), "identity": identity}   # in every checkpoint

    def restore(self, resume: bool | str) -> str:
        modules, optimizer = self.strategy.checkpoint_views(self.student, self.objective, self.optimizer)
        path, self.state = resume_checkpoint(self.ckpt_root, resume, modules, optimizer, self.scheduler, self.rank,
                                             world=self.world)   # verified; no pickle
        self.source.load_state(self.state.get("sequences"))
        return str(path)

    def unwrapped(self):
        return self.strategy.unwrap(self.student)

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
        self.hook("on_step_begin", step)
        prepared = self.build_sequences(step)
        totals = self.token_totals(prepared)
        logged, total_loss = self.forward_backward(prepared, totals)
        if not self.all_sum(torch.isfinite(total_loss).float()) >= self.world:
            self.optimizer.zero_grad(set_to_none=True)
            self.state["bad_steps"] += 1
            self.state["skipped_steps"] += 1
            return {"loss": float("nan"), "skipped": 1}
        self.state["bad_steps"] = 0
        return self.step_metrics(prepared, totals, total_loss, logged, self.update())

    def build_sequences(self, step: int) -> list[tuple]:
        """``[(gold, sequences, slot)]`` per micro-batch of this process's rows of the step's global batch (with
        several teachers, each micro-batch one teacher's rows: ``route_plan.py``)."""
        cfg = self.cfg
        idx = global_batch_indices(step, cfg.batch_size, len(self.train_rows), cfg.seed)
        slots = micro_batches(self.teacher, [self.train_rows[i] for i in idx], self.rank, self.world,
                              cfg.micro_batch_size, cfg.micro_batch_order)
        prepared = []
        with self.strategy.generation(*self.generation_models):
            for m, slot in enumerate(slots):   # a stand-in (weight 0) keeps processes in step: gold rows
                seqs = self.source.build(slot.rows, step=step, micro=m, rank=self.rank, student=self.unwrapped(),
                                         teacher=self.teacher, tokenizer=self.tokenizer) if slot.weight else \
                    self.source.gold(slot.rows, self.tokenizer)
                gold = seqs if seqs.is_gold else self.source.gold(slot.rows, self.tokenizer)  # one batch serves both
                prepared.append((gold, seqs, slot))
                if slot.weight:
                    self.hook("on_sequences", step, seqs)
        return prepared

    def token_totals(self, prepared) -> dict[str, torch.Tensor]:
        """Global token counts per token set, so every micro-batch and process is weighted by its tokens."""
        live = [(g, s) for g, s, slot in prepared if slot.weight]   # stand-ins (route_plan.py) count nothing
        counts = {"gold": sum(shifted(g.batch)[1].sum() for g, _ in live),
                  "sequences": sum(shifted(s.batch)[1].sum() for _, s in live), "batch": len(live),
                  "positions": sum(s.batch["attention_mask"].sum() for _, s in live)}
        return {k: self.all_sum(torch.as_tensor(v, dtype=torch.float32, device=self.acc.device)).clamp(min=1)
                for k, v in counts.items()}

    def forward_backward(self, prepared, totals) -> tuple[dict, torch.Tensor]:
        """Every term of every micro-batch, weighted by its token share; backward per micro-batch."""
        dev, weights = self.acc.device, self.objective.weights
        logged = loss_keys(weights, self.teacher)
        self.term_stats: dict[str, float] = {}   # the terms' ENTRY/name statistics (Term.last_stats), token-weighted
        total_loss = torch.zeros((), device=dev)
        for m, (gold, seqs, slot) in enumerate(prepared):
            inputs = TermInputs(self.student, reader(self.teacher, seqs.rows),
                                {k: v.to(dev) for k, v in gold.batch.items()},
                                {k: v.to(dev) for k, v in seqs.batch.items()}, same=seqs.is_gold,
                                whole=self.whole_logits, rows=seqs.rows, tokenizer=self.tokenizer,
                                sampling=self.sampling, fields=seqs.fields)
            with self.strategy.no_sync(self.student, last=m == len(prepared) - 1), self.acc.autocast():
                loss = torch.zeros((), device=dev)
                for name, (mean, tokens) in self.objective(inputs, chunked=self.cfg.chunked_loss).items():
                    part = mean * inputs.token_count(tokens) / totals[tokens] * slot.weight
                    loss = loss + weights[name] * part * self.world
                    add_part(logged, name, slot, float(part.detach()))   # and the teacher's share (TERM@NAME)
                for name, (mean, tokens) in self.objective.unbalanced.items():   # balance_with: the term's own value
                    key = f"{name}_unbalanced"
                    logged[key] = logged.get(key, 0.0) + float(mean * inputs.token_count(tokens) / totals[tokens]
                                                               * slot.weight)
                for key, (value, tokens) in self.objective.stats.items():
                    share = float(inputs.token_count(tokens) / totals[tokens]) * slot.weight
                    self.term_stats[key] = self.term_stats.get(key, 0.0) + value * share
                self.acc.backward(loss)
            self.strategy.after_micro_batch(self.teacher)
            total_loss += loss.detach() / self.world
        return logged, total_loss

    def update(self):
        """Clip (when ``clip_grad``), step the optimiser and the schedule; the gradient norm (or ``None``)."""
        self.strategy.sync_objective_grads(self.objective.parameters())
        grad_norm = self.strategy.clip(self.params(), self.cfg.clip_grad) if self.cfg.clip_grad > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def step_metrics(self, prepared, totals, total_loss, logged, grad_norm) -> dict:
        # throughput counts the distilled sequences' tokens, or the gold ones when only gold-token terms train
        tokens = float(totals["sequences"] if "sequences" in self.objective.token_sets else totals["gold"])
        self.state["tokens_seen"] += tokens
        metrics = {"loss": float(self.all_sum(total_loss)), "lr": self.scheduler.get_last_lr()[0], "tokens": tokens}
        metrics.update({f"loss/{k}": float(self.all_sum(torch.tensor(v))) for k, v in logged.items()})
        metrics.update({k: float(self.all_sum(torch.tensor(v))) for k, v in self.term_stats.items()})
        metrics.update(route_tokens(prepared, self.objective.token_sets, self.teacher, self.all_sum))  # tokens@NAME
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        live = [s for _, s, slot in prepared if slot.weight]
        for s in live:
            for k, v in s.stats.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(live)
        return metrics

    # ------------------------------------------------------------------ validation, stops
    def validation_due(self, step: int) -> bool:
        """Every ``eval_steps``; after the last step as ``final_validation`` says (``auto``: when ``eval_steps``
        fired during the run, so ``best/`` is chosen among the final weights too)."""
        if step % self.cfg.eval_steps == 0:
            return True
        if step != self.cfg.max_steps or self.cfg.final_validation == "never":
            return False
        return self.cfg.final_validation == "always" or self.cfg.max_steps >= self.cfg.eval_steps

    def validate(self, step: int) -> dict:
        cfg = self.cfg
        if not getattr(self, "_told_validation", False) and self.rank == 0 and self.valid_rows:
            print(f"[lmdistill] validation: {len(self.valid_rows)} examples of {cfg.valid_data} (eval_limit), answers "
                  f"of at most {cfg.eval_max_new_tokens} new tokens (eval_max_new_tokens), every {cfg.eval_steps} "
                  "steps (eval_steps)")
            self._told_validation = True
        with self.strategy.generation(self.student, None):   # FSDP2: validation decodes on gathered weights
            metrics = validate(self.unwrapped(), self.tokenizer, self.valid_rows, batch_size=cfg.micro_batch_size,
                               max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed, template=cfg.template,
                               progress=cfg.progress and self.rank == 0)
        self.source.observe_validation(metrics)
        return metrics

    def stop_agreed(self, stop: StopSignals) -> bool:
        """Whether any process was asked to stop (every process takes the same decision at the same step)."""
        asked = torch.tensor(float(stop.requested), device=self.acc.device)
        return bool(self.all_sum(asked) > 0) if self.world > 1 else stop.requested

    def stopped(self, step: int, stop: StopSignals, start: int) -> Stopped:
        """Save a checkpoint of ``step`` (unless it has one already) and say what was kept."""
        if step == start:
            saved = f"no step had finished since {'the checkpoint it resumed from' if start else 'the start'}"
        else:
            path = self.ckpt_root / f"step-{step:07d}"
            if not (path / "manifest.json").exists():
                path = self.save(step)
            saved = f"checkpoint {path} is verified; rerun with --resume to continue exactly from there"
        return Stopped(f"{stop.name or 'signal'} after step {step} of {self.cfg.max_steps}: {saved}",
                       stop.exit_code or 130)

    # ------------------------------------------------------------------ export, checkpoints
    def export(self, name: str) -> Path:
        path = self.out / name
        model = self.strategy.full_student(self.student, load_student)   # FSDP2: gathered on every rank
        if self.rank != 0:
            return path
        if self.cfg.lora:
            model = copy.deepcopy(model).merge_and_unload()
        with atomic_dir(path) as tmp:
            model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            copy_license_files(self.cfg.student, tmp)   # the student's terms travel with it (Gemma's, section 3.1)
        if name == "final":   # the objective's own trained parameters (a hidden-state projection), beside final/
            self.objective.write_artifacts(self.out)
        return path

    def save(self, step: int) -> Path:
        self.state["sequences"] = self.source.state()
        modules, optimizer = self.strategy.checkpoint_views(self.student, self.objective, self.optimizer)
        self.strategy.gather_for_save(modules, optimizer)
        return save_checkpoint(self.ckpt_root, step, modules, optimizer, self.scheduler, self.state,
                               keep=self.cfg.keep_checkpoints, rank=self.rank, world=self.world)
