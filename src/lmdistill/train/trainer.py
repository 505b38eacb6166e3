"""``lmdistill train``: distill a teacher into a student with any recipe, on one process or many (accelerate).

:func:`train` owns the run folder (``ownership.py``: locked, never mixed with another run), builds the
:class:`~lmdistill.train.run.Run` and drives it: an optimiser step at a time (``Run.step``), validation every
``eval_steps``, a checkpoint every ``save_steps`` (verified, exact to resume), the exported ``final/`` (and ``best/``)
model. SIGTERM and SIGINT finish the current step and save. It knows no method, policy, term or parallelism strategy
by name: those are the recipe's (``sources.py``, ``losses.objective``) and the launcher's (``parallel.py``).

Callbacks (``train(cfg, callbacks=[...])``) see ``on_step_begin(run, step)``, ``on_sequences(run, step, seqs)`` for
each micro-batch's sequences and ``on_step_end(run, step, metrics)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmdistill.errors import LmdistillError
from lmdistill.io import link_dir, write_json
from lmdistill.runtime import StopSignals, rank_world
from lmdistill.train.checkpoint import latest_checkpoint
from lmdistill.train.config import TrainConfig
from lmdistill.train.metrics_log import MetricsLog, plot_curves
from lmdistill.train.ownership import RunLock, claim_folder, record_run, run_identity
from lmdistill.train.run import Run
from lmdistill.train.setup import resolve_config_template


class TrainingError(LmdistillError):
    """Training stopped (repeated non-finite losses, ...)."""


class Callback:
    """Hooks into the loop; override what you need (``bench/train.py`` times steps with them)."""

    def on_step_begin(self, run: Run, step: int) -> None: ...

    def on_sequences(self, run: Run, step: int, seqs) -> None: ...

    def on_step_end(self, run: Run, step: int, metrics: dict) -> None: ...


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
    memory = run.strategy.memory_report(run.student, run.teacher)   # FSDP2: a collective
    if memory is not None and main:
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
