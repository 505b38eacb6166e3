"""``lmdistill train``: distill a teacher into a student with any recipe, on one process or many (accelerate).

The loop, per optimiser step: take the step's global batch (fixed by seed and step), keep this process's rows,
let the recipe's sequence source build the distilled sequences, count loss tokens across processes, then run
forward and backward per micro-batch with every objective term weighted by its share of its token set's global
count, so one process and N processes optimise the same objective. Non-finite losses skip the step; checkpoints
restore exactly. The trainer knows no method by name: the policy is a sequence source (``sequences.py``), the loss
an objective of registered terms (``lmdistill.losses.objective``).

Several processes: DDP through ``accelerate.prepare``, or FSDP2 (``configs/accelerate/fsdp2.yaml``), where
``train/fsdp.py`` shards the student and the teacher, gathers them for generation and writes full-state (or per-rank sharded) checkpoints.

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

from lmdistill.errors import LmdistillError, Stopped
from lmdistill.generation.policies.scrg import scores_sequences
from lmdistill.io import atomic_dir, link_dir, write_json
from lmdistill.losses.model_forward import shifted
from lmdistill.models.model_card import copy_license_files
from lmdistill.losses.objective import Objective
from lmdistill.losses.term import TermInputs
from lmdistill.train.checkpoint import latest_checkpoint, resume_checkpoint, save_checkpoint
from lmdistill.train.config import TrainConfig, samples_teacher
from lmdistill.train.data_order import global_batch_indices, rank_slice
from lmdistill.train.fsdp import (FullOptimizer, FullState, ShardedOptimizer, ShardedState, all_reduce_grads,
                                  clip_grad_norm, fsdp_requested, full_state_dict, gathered, local_param_bytes,
                                  release, shard)
from lmdistill.runtime import StopSignals, rank_world
from lmdistill.train.metrics_log import MetricsLog, plot_curves
from lmdistill.train.ownership import RunLock, claim_folder, fingerprint, record_run, run_identity
from lmdistill.train.sources import make_sequence_source
from lmdistill.train.setup import (load_rows, load_student, load_teacher, load_tokenizers, make_accelerator,
                                   make_optimizer, make_scheduler, resolve_config_template)
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

    def __init__(self, cfg: TrainConfig, resume: bool | str = False, callbacks=(), identity: dict | None = None):
        self.cfg, self.out, self.callbacks = cfg, Path(cfg.output_dir), list(callbacks)
        self.acc = make_accelerator(cfg)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizers(cfg)
        self.train_rows, self.valid_rows, self.filter_reports = load_rows(cfg, self.tokenizer)
        device = self.acc.device
        self.fsdp = fsdp_requested()   # FSDP2 from the launcher config (train/fsdp.py); sharded here, not by prepare
        student = load_student(cfg, device)
        self.teacher = load_teacher(cfg, device, self.tokenizer)   # a model, a cache or a server
        # what the sequence engine may sample with: only a teacher in this process
        self.local_teacher = self.teacher if isinstance(self.teacher, torch.nn.Module) else None
        # what it may score with: that teacher, or a served one (SCRG scores whole responses through it)
        self.generation_teacher = self.local_teacher if self.local_teacher is not None else \
            self.teacher if scores_sequences(self.teacher) else None
        if self.fsdp:
            bf16 = self.acc.mixed_precision == "bf16"
            shard(student, bf16=bf16)
            if self.local_teacher is not None:
                shard(self.local_teacher, frozen=True, bf16=bf16)   # eval, no gradients, no optimiser state
        self.objective = Objective(cfg.objective).to(device)   # after the models: its parameters draw random numbers
        self.whole_logits = self.objective.whole_logits(student)
        self.sampling = cfg.sampling_config(cfg.seed)   # what the terms may read of how sequences are drawn
        optimizer = make_optimizer(cfg, self.params(student))
        self.scheduler = make_scheduler(cfg, optimizer)
        if self.fsdp:
            self.student, self.optimizer = student, optimizer   # FSDP2 syncs gradients; no DDP wrapper
        else:
            self.student, self.optimizer = self.acc.prepare(student, optimizer)
        self.source = make_sequence_source(cfg)
        policy = self.source.generator_policy(cfg)
        # under FSDP2 generation decodes on gathered weights: the student's, and the teacher's when it samples
        self.gather_for_generation = (student, self.local_teacher if samples_teacher(cfg) else None) \
            if self.fsdp and policy else ()
        self.state = {"step": 0, "bad_steps": 0, "skipped_steps": 0, "best_rouge": None, "best_step": None,
                      "sequences": None, "tokens_seen": 0}
        self.ckpt_root = self.out / "checkpoints"
        self.resumed_from = self.restore(resume) if resume else None
        identity = run_identity(resolve_config_template(cfg))   # the template the run will use, not "auto" if identity is None else identity
        self.state["run"] = {"fingerprint": fingerprint(identity), "identity": identity}   # in every checkpoint

    def restore(self, resume: bool | str) -> str:
        path, self.state = resume_checkpoint(self.ckpt_root, resume, self.modules(), self.checkpoint_optimizer(),
                                             self.scheduler, self.rank, world=self.world)   # verified; no pickle
        self.source.load_state(self.state.get("sequences"))
        return str(path)

    @property
    def sharded_checkpoints(self) -> bool:
        return self.fsdp and self.cfg.checkpoint_format == "sharded"

    def modules(self) -> dict:
        # under FSDP2 the student is saved and loaded as its full state dict (the one-process files), or with
        # checkpoint_format=sharded as each rank's own shards
        if not self.fsdp:
            return {"student": self.unwrapped(), "objective": self.objective}
        state = ShardedState(self.student) if self.sharded_checkpoints else FullState(self.student)
        return {"student": state, "objective": self.objective}

    def checkpoint_optimizer(self):
        if not self.fsdp:
            return self.optimizer
        return ShardedOptimizer(self.optimizer) if self.sharded_checkpoints else FullOptimizer(self.optimizer)

    def unwrapped(self):
        """The HF model (under FSDP2 the sharded model itself: its parameters are DTensors; ``full_student()``
        gathers them)."""
        return self.student if self.fsdp else self.acc.unwrap_model(self.student)

    def full_student(self):
        """A plain, unsharded copy of the student on rank 0 (under FSDP2, gathered: a collective; ``None`` on the
        other ranks), the student itself without FSDP."""
        if not self.fsdp:
            return self.unwrapped()
        state = full_state_dict(self.student)
        if self.rank != 0:
            return None
        with torch.random.fork_rng(devices=[]):   # building a model draws random numbers: keep the run's stream
            model = load_student(self.cfg, "cpu")
        model.load_state_dict(state)
        return model

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
        if cfg.micro_batch_order == "length":   # similar lengths share a micro-batch: less padding computed
            mine.sort(key=lambda r: len(r.input_ids))
        micros = [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
        prepared = []
        with gathered(*self.gather_for_generation):   # FSDP2: every rank gathers, whatever its source decides
            for m, rows in enumerate(micros):
                seqs = self.source.build(rows, step=step, micro=m, rank=self.rank, student=self.unwrapped(),
                                         teacher=self.generation_teacher, tokenizer=self.tokenizer)
                gold = seqs if seqs.is_gold else self.source.gold(rows, self.tokenizer)  # one batch serves both
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
            ctx = acc.no_sync(self.student) if m < len(prepared) - 1 and not self.fsdp else nullcontext()
            with ctx, acc.autocast():
                loss = torch.zeros((), device=acc.device)
                for name, (mean, tokens) in self.objective(inputs, chunked=cfg.chunked_loss).items():
                    part = mean * inputs.token_count(tokens) / totals[tokens]
                    loss = loss + weights[name] * part * self.world
                    logged[name] += float(part.detach())
                acc.backward(loss)
            release(self.local_teacher if self.fsdp else None)   # FSDP2: the teacher back to its shards
            total_loss += loss.detach() / self.world
        if not self.all_sum(torch.isfinite(total_loss).float()) >= self.world:
            self.optimizer.zero_grad(set_to_none=True)
            self.state["bad_steps"] += 1
            self.state["skipped_steps"] += 1
            return {"loss": float("nan"), "skipped": 1}
        self.state["bad_steps"] = 0
        if self.world > 1:   # the objective's own parameters (DAC-KL's) are in neither DDP nor FSDP
            all_reduce_grads(list(self.objective.parameters()), self.world)
        clip = clip_grad_norm if self.fsdp else acc.clip_grad_norm_
        grad_norm = clip(self.params(), cfg.clip_grad) if cfg.clip_grad > 0 else None
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
        with gathered(self.student if self.fsdp else None):   # FSDP2: validation decodes on gathered weights
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
        name = stop.name or "signal"
        return Stopped(f"{name} after step {step} of {self.cfg.max_steps}: {saved}", stop.exit_code or 130)

    # ------------------------------------------------------------------ export
    def export(self, name: str) -> Path:
        path = self.out / name
        if self.rank != 0 and not self.fsdp:
            return path
        model = self.full_student()   # under FSDP2 gathered on every rank, kept on rank 0
        if self.rank != 0:
            return path
        if self.cfg.lora:
            model = copy.deepcopy(model).merge_and_unload()
        with atomic_dir(path) as tmp:
            model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            copy_license_files(self.cfg.student, tmp)   # the student's terms travel with it (Gemma's, section 3.1)
        return path

    def memory_report(self) -> dict:
        """Parameter bytes each rank holds for the student and the teacher (local shards) and their full sizes
        (under FSDP2, written to ``fsdp.json``; a collective)."""
        report = {"world_size": self.world}
        for name, model in (("student", self.student), ("teacher", self.local_teacher)):
            if model is None:
                continue
            local = [None] * self.world
            torch.distributed.all_gather_object(local, local_param_bytes(model))
            report[name] = {"full_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                            "local_bytes": local}
        return report

    def save(self, step: int) -> Path:
        self.state["sequences"] = self.source.state()
        modules, optimizer = self.modules(), self.checkpoint_optimizer()
        if self.fsdp:   # full: gather on every rank (collectives), rank 0 writes the files; sharded: no-ops
            modules["student"].gather()
            optimizer.gather()
        return save_checkpoint(self.ckpt_root, step, modules, optimizer, self.scheduler, self.state,
                               keep=self.cfg.keep_checkpoints, rank=self.rank, world=self.world)


def train(cfg: TrainConfig, resume: bool | str = False, callbacks=(), overwrite: bool = False) -> dict:
    """Run (or resume) training; returns the final state with the paths of the exported models.

    The output folder belongs to this run (``train/ownership.py``): it is locked while the run lives, a folder
    holding another run is refused unless ``resume`` (same settings) or ``overwrite``. SIGTERM and SIGINT finish
    the current optimiser step, save a verified checkpoint and raise :class:`~lmdistill.errors.Stopped`.
    """
    out = Path(cfg.output_dir)
    rank = rank_world()[0]   # the launcher's RANK: the process group starts later, in Run
    identity = run_identity(resolve_config_template(cfg))   # the template the run will use, not "auto"
    lock = RunLock(out) if rank == 0 else None
    try:
        if rank == 0:
            claim_folder(out, identity, resume, overwrite)
        with StopSignals("finishing the current step, then saving a checkpoint") as stop:
            return _train(Run(cfg, resume, callbacks, identity), resume, stop)
    finally:
        if lock is not None:
            lock.release()


def _train(run: Run, resume, stop: StopSignals) -> dict:
    cfg = run.cfg
    main = run.rank == 0
    start = run.state["step"]
    log = MetricsLog(run.out, enabled=main, truncate_after=start if resume else 0)
    if main:
        record_run(run.out, run.state["run"]["identity"])
        write_json(run.out / "config.json", {**cfg.__dict__, "filters": run.filter_reports, "world_size": run.world})
        for r in run.filter_reports:
            print(f"[lmdistill] {r}")
        if run.resumed_from:
            print(f"[lmdistill] resumed from {run.resumed_from} at step {start}")
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (main and cfg.progress), desc=f"train {cfg.method}",
               dynamic_ncols=True)
    t0, tokens0 = time.time(), run.state["tokens_seen"]
    step = start
    try:
        if start == 0 and run.source.needs_initial_validation and run.valid_rows:
            log.write(0, run.validate(0))   # the source's reference point (e.g. DistiLLM's step-0 validation loss)
        while step < cfg.max_steps and not run.stop_agreed(stop):
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
            if run.validation_due(step):
                val = run.validate(step)
                metrics.update(val)
                rouge = val.get("val/rougeL")
                if rouge is not None and (run.state["best_rouge"] is None or rouge > run.state["best_rouge"]):
                    run.state["best_rouge"], run.state["best_step"] = rouge, step
                    if step < cfg.max_steps:   # at the last step best/ is final/: linked after the export
                        run.export("best")
            if step % cfg.log_steps == 0 or step == cfg.max_steps:
                log.write(step, metrics)
            if step % cfg.save_steps == 0 or step == cfg.max_steps:
                run.save(step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if step < cfg.max_steps:   # a signal: keep what was done, say where
            raise run.stopped(step, stop, start)
    finally:
        bar.close()
        log.close()
    if run.fsdp:
        memory = run.memory_report()   # a collective
        if main:
            write_json(run.out / "fsdp.json", memory)
    final = run.export("final")
    best = None
    if run.state["best_step"] is not None:
        best = str(run.out / "best")
        if run.state["best_step"] == step and main:
            link_dir(run.out / "best", "final")   # the same weights: a link, not a second copy
    result = {"final": str(final), "best": best, "best_step": run.state["best_step"],
              "best_rougeL": run.state["best_rouge"], "skipped_steps": run.state["skipped_steps"], "steps": step}
    if run.acc.device.type == "cuda":   # peak GPU memory of every rank (bench/gpu_check.sh prints it)
        peaks = [None] * run.world
        local = torch.cuda.max_memory_allocated(run.acc.device)
        if run.world > 1:
            torch.distributed.all_gather_object(peaks, local)
        else:
            peaks = [local]
        result["cuda_peak_bytes"] = peaks
    if main:
        result["curves"] = str(plot_curves(run.out / "metrics.jsonl", run.out / "curves.png"))
        write_json(run.out / "result.json", result)
    run.acc.wait_for_everyone()
    # tear the process group down before the interpreter exits: a rank whose gloo threads were still alive at
    # exit aborted ("terminate called without an active exception") after the run had finished
    run.acc.end_training()
    return result
