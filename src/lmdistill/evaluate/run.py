"""The five-benchmark ROUGE-L evaluation (MiniLLM protocol) of one or more models.

``evaluate_models`` generates with every seed for every model and benchmark, scores each
prediction with ROUGE-L, and writes into ``out_dir``:

- ``predictions/<model>/<benchmark>/seed<k>.jsonl`` (+ ``.meta.json``), reused by a rerun;
- ``results.json`` (per model, benchmark and seed, the mean, the std, the counts and all settings),
  ``results.csv``, ``results.md`` (rows models, columns benchmarks and average) and ``results.png``.

Protocol defaults (docs/METHODS.md): Alpaca template, temperature 1.0, top-p 1.0, top-k 0,
``no_repeat_ngram_size`` 6, prompts over 256 tokens truncated to their first 256 tokens (and counted), at
most 256 new tokens, stop at EOS, strip the text; ROUGE-L F-measure x100 with the stemmer, max over
references, mean over examples; seeds 10..50, mean ± std (sample std, ddof=1; 0 for one seed) over seeds.
The average column is the mean over benchmarks, taken per seed, then mean ± std over seeds.

Where the two decoding settings come from (MiniLLM = microsoft/LMOps ``minillm/``, DistiLLM = jongwooko/distillm):

- ``no_repeat_ngram_size = 6``: the default of ``--no-repeat-ngram-size`` (MiniLLM ``arguments.py:180``,
  DistiLLM ``arguments.py:203``), never overridden by the eval scripts (``scripts/*/eval/eval_main_*.sh`` pass
  only ``--do-sample --top-k 0 --top-p 1.0 --temperature 1.0``), handed to HF ``generate`` through
  ``GenerationConfig(no_repeat_ngram_size=...)`` (MiniLLM ``evaluate_main.py:61``, DistiLLM
  ``evaluate_main.py:50``). Ours bans over the prompt without its left padding + the response (transformers
  sees the padded row, pad = EOS; the two differ only where a row's last ``n - 1`` tokens contain the pad id).
- ``prompt_overflow = truncate``: the eval scripts pass ``--json-data --max-prompt-length 256`` and
  ``PromptDataset.__getitem__`` keeps ``data[:prompt_length]`` (the FIRST 256 prompt tokens; MiniLLM
  ``data_utils/prompt_datasets.py:104-106``, DistiLLM the same lines); nothing is dropped at evaluation (the
  drop in MiniLLM's ``tools/process_data_dolly.py:57-58`` builds the training data). With the Alpaca template
  a cut prompt loses its ``### Response:`` tail, as in the reference. ``drop`` (our former rule) is kept as an option.
  Every truncated or dropped id is listed per benchmark in results.json (``truncated_ids``, ``dropped_ids``).
- at most 256 new tokens: ``max_new_tokens = max_length - prompt width = 512 - 256`` (MiniLLM
  ``evaluate_main.py:103``, DistiLLM ``evaluate_main.py:88``; the collate pads every prompt to 256,
  ``prompt_datasets.py:121``).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from lmdistill import __version__
from lmdistill.data import EVAL_BENCHMARKS, Example, load_examples
from lmdistill.data.registry import BENCHMARKS
from lmdistill.data.templates import TEMPLATES
from lmdistill.errors import ConfigError
from lmdistill.evaluate.predictors import (PROMPT_OVERFLOW, Item, ModelSpec, Prediction, make_predictor,
                                           parse_model_specs)
from lmdistill.evaluate.report import AVERAGE, write_reports
from lmdistill.evaluate.store import bench_dirname, load_finished, save_seed, seed_paths
from lmdistill.generation import SamplingConfig
from lmdistill.rouge import rouge_l

PROTOCOL_SEEDS = (10, 20, 30, 40, 50)


@dataclass
class EvalSettings:
    """Everything that shapes a result; recorded in results.json."""

    benchmarks: list[str] = field(default_factory=lambda: list(EVAL_BENCHMARKS))
    seeds: list[int] = field(default_factory=lambda: list(PROTOCOL_SEEDS))
    batch_size: int = 16
    limit: int | None = None
    greedy: bool = False
    num_samples: int = 1
    max_new_tokens: int = 256
    max_prompt_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 6  # the protocol's (see the module docstring); 0 = off
    prompt_overflow: str = "truncate"  # or "drop"; what happens to prompts over max_prompt_length tokens
    template: str = "alpaca"
    average_all: bool = False  # False: benchmarks marked out of the average (UnNI's 1-2-word bucket) are left out
    device: str | None = None
    dtype: str = "float32"

    def validate(self) -> None:
        if not self.benchmarks:
            raise ConfigError("no benchmark given")
        for b in self.benchmarks:
            name, _, split = b.partition(":")
            if name not in BENCHMARKS:
                raise ConfigError(f"unknown benchmark {b!r}; choose from {', '.join(BENCHMARKS)}")
            if split and split not in BENCHMARKS[name].splits:
                raise ConfigError(f"benchmark {name} has no split {split!r}; splits: {', '.join(BENCHMARKS[name].splits)}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ConfigError(f"a benchmark is listed twice: {', '.join(self.benchmarks)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        for key in ("batch_size", "num_samples", "max_new_tokens", "max_prompt_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1 (or 0 / None for all), got {self.limit}")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise ConfigError("no-repeat-ngram-size must be an integer >= 0 (0 = off), "
                              f"got {self.no_repeat_ngram_size!r}")
        if self.prompt_overflow not in PROMPT_OVERFLOW:
            raise ConfigError(f"prompt-overflow must be one of {', '.join(PROMPT_OVERFLOW)}, "
                              f"got {self.prompt_overflow!r}")

    def sampling(self) -> SamplingConfig:
        """The generation package's sampling config of these settings (the seed is set per seed run)."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, do_sample=not self.greedy,
                              no_repeat_ngram_size=self.no_repeat_ngram_size)

    def fingerprint(self, spec: ModelSpec, bench: str) -> dict:
        """The settings a finished seed file must share to be reused (batch size, device, dtype excluded)."""
        source = str(Path(spec.source).resolve()) if not spec.is_api and Path(spec.source).exists() else spec.source
        return {"source": source, "benchmark": bench, "limit": self.limit, "greedy": self.greedy,
                "num_samples": self.num_samples, "max_new_tokens": self.max_new_tokens,
                "max_prompt_length": self.max_prompt_length, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "no_repeat_ngram_size": self.no_repeat_ngram_size,
                "prompt_overflow": self.prompt_overflow, "template": "chat" if spec.is_api else self.template}


def _mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _prediction_row(item: Item, pred: Prediction, refs: list[str]) -> dict:
    scores = [rouge_l(text, refs) for text in pred.outputs]
    row = {"id": item.example.id, "output": pred.outputs[0], "rougeL": statistics.fmean(scores)}
    many = len(pred.outputs) > 1
    if many:
        row["outputs"] = pred.outputs
        row["rougeL_samples"] = scores
    if pred.tokens is not None:
        row["tokens"] = pred.tokens if many else pred.tokens[0]
        row["stopped"] = pred.stopped if many else pred.stopped[0]
    return row


def _seed_summary(rows: list[dict]) -> dict:
    summary = {"rougeL": statistics.fmean(r["rougeL"] for r in rows) if rows else None, "n": len(rows)}
    if rows and "rougeL_samples" in rows[0]:
        summary["best_of_k"] = statistics.fmean(max(r["rougeL_samples"]) for r in rows)
    return summary


def _load_benchmark(bench: str, limit: int | None) -> list[Example]:
    examples = load_examples(bench).examples
    return examples[:limit] if limit is not None else examples


def length_order(items: list[Item]) -> list[int]:
    """Item indices by prompt length (stable; API items, which carry no ids, keep their order).

    Batches are cut from this order so that the prompts of a batch have similar lengths: a left-padded batch
    computes every row at the longest prompt's width, and on the benchmarks' first 100 examples in file order
    (batch 32) 39-84% of the prefill positions are real tokens, 72-93% when sorted. A prediction depends on its
    batch only through the rounding of the left padding (``predictors`` module docstring), so the order changes
    no result beyond such near-ties."""
    return sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids or ()))


def evaluate_benchmark(predictor, spec: ModelSpec, bench: str, examples: list[Example], settings: EvalSettings,
                       out_dir: Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Generate (or reuse) every seed of one model on one benchmark; return its results entry."""
    from tqdm.auto import tqdm

    items, report = predictor.prepare(examples, settings.max_prompt_length, settings.prompt_overflow)
    ids = [it.example.id for it in items]
    fingerprint = settings.fingerprint(spec, bench)
    bench_dir = bench_dirname(bench)
    per_seed: dict[int, dict] = {}
    pending = []
    for seed in settings.seeds:
        pred_path, meta_path = seed_paths(out_dir, spec.dirname, bench_dir, seed)
        rows = None if overwrite else load_finished(pred_path, meta_path, fingerprint, ids)
        if rows is None:
            pending.append(seed)
        else:
            per_seed[seed] = _seed_summary(rows)
    desc = f"{spec.name} / {bench}"
    if not pending and progress:
        tqdm.write(f"{desc}: reused finished seeds {', '.join(map(str, settings.seeds))}", file=sys.stderr)
    sampling = settings.sampling()
    with tqdm(total=len(items) * len(pending), desc=desc, unit="ex", disable=not progress or not pending,
              file=sys.stderr, dynamic_ncols=True) as bar:
        order = length_order(items)
        for seed in pending:
            bar.set_postfix_str(f"seed {seed}")
            by_index: dict[int, dict] = {}
            for start in range(0, len(order), settings.batch_size):
                picked = order[start:start + settings.batch_size]
                batch = [items[i] for i in picked]
                for i, item, pred in zip(picked, batch, predictor.predict(batch, seed, sampling, settings.num_samples)):
                    by_index[i] = _prediction_row(item, pred, item.example.references)
                bar.update(len(batch))
            rows = [by_index[i] for i in range(len(items))]   # the benchmark's order
            summary = _seed_summary(rows)
            pred_path, meta_path = seed_paths(out_dir, spec.dirname, bench_dir, seed)
            save_seed(pred_path, meta_path, rows, fingerprint,
                      {**summary, "seed": seed, "batch_size": settings.batch_size, "dtype": settings.dtype,
                       "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            per_seed[seed] = summary
    scores = [per_seed[s]["rougeL"] for s in settings.seeds if per_seed[s]["rougeL"] is not None]
    mean, std = _mean_std(scores)
    entry = {"seeds": {str(s): per_seed[s]["rougeL"] for s in settings.seeds}, "mean": mean, "std": std,
             "n": len(items), "dropped": report.removed, "dropped_ids": list(report.removed_ids),
             "truncated": report.truncated, "truncated_ids": list(report.truncated_ids),
             "total": len(examples), "filter": report.reason}
    if settings.num_samples > 1:
        entry["best_of_k"] = {str(s): per_seed[s].get("best_of_k") for s in settings.seeds}
    return entry


def averaged_benchmarks(benchmarks: Sequence[str], average_all: bool = False) -> list[str]:
    """The benchmarks the average column covers: all with ``average_all``, else those not marked out of it (UnNI's
    1-2-word bucket is not the papers' set). When every listed benchmark is marked out, all are averaged."""
    kept = [b for b in benchmarks if average_all or BENCHMARKS[b.partition(":")[0]].in_average]
    return kept or list(benchmarks)


def average_entry(bench_entries: dict[str, dict], seeds: Sequence[int], over: Sequence[str] | None = None) -> dict:
    """Mean over benchmarks (``over``, default all) per seed, then mean ± std over seeds."""
    per_seed: dict[str, float | None] = {}
    over = list(bench_entries) if over is None else list(over)
    for s in seeds:
        vals = [bench_entries[b]["seeds"].get(str(s)) for b in over]
        per_seed[str(s)] = statistics.fmean(vals) if vals and all(v is not None for v in vals) else None
    mean, std = _mean_std([v for v in per_seed.values() if v is not None])
    return {"seeds": per_seed, "mean": mean, "std": std, "over": over}


def _release(predictor) -> None:
    predictor.close()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def evaluate_models(models: Sequence[str | ModelSpec], benchmarks: Sequence[str] = EVAL_BENCHMARKS,
                    seeds: Sequence[int] = PROTOCOL_SEEDS, out_dir: str | Path = "eval", *,
                    batch_size: int = 16, limit: int | None = None, greedy: bool = False, num_samples: int = 1,
                    max_new_tokens: int = 256, max_prompt_length: int = 256, device: str | None = None,
                    dtype: str = "float32", api_key_env: str | None = None, overwrite: bool = False,
                    progress: bool = True, template: str = "alpaca", no_repeat_ngram_size: int = 6,
                    prompt_overflow: str = "truncate", average_all: bool = False, workers: int = 1,
                    executor=None, quick_hint: str = "") -> dict:
    """Evaluate ``models`` (``[name=]source`` strings or ``ModelSpec``) and write the result files.

    ``template`` is the prompt of local models: ``alpaca`` (the protocol) or ``chat`` (the tokenizer's chat
    template, for instruction-tuned models that have one); API models always go through their server's template.
    ``no_repeat_ngram_size`` (6) and ``prompt_overflow`` (``truncate``) are the protocol's decoding settings
    (module docstring). ``average_all`` puts every benchmark in the average (default: UnNI's 1-2-word bucket is
    left out). Returns the results dict also written to ``out_dir/results.json``. With ``greedy`` only the
    first seed is run (greedy decoding ignores the seed). Finished seeds in ``out_dir`` are reused
    unless ``overwrite``. ``limit`` None or 0: every example. Before anything loads, one line on stderr states the
    cost (``cost_line``), followed by ``quick_hint`` when the run is longer than a quick check.

    ``workers > 1`` (or an ``executor``, a process pool such as ``runtime.worker_pool``'s) generates the local
    models' predictions as independent (model, benchmark) jobs in that many processes, each writing its own seed
    files; the results are then assembled here from those files exactly as a rerun reuses finished seeds. Each
    prediction depends only on the model, the seed and the example (``predictors``), so the files, the table and
    every number are the ones one process writes.
    """
    seeds = list(seeds)
    limit = limit or None   # 0 = all, as every --limit
    if greedy and len(seeds) > 1:
        seeds = seeds[:1]
    settings = EvalSettings(benchmarks=list(benchmarks), seeds=seeds, batch_size=batch_size, limit=limit,
                            greedy=greedy, num_samples=num_samples, max_new_tokens=max_new_tokens,
                            max_prompt_length=max_prompt_length, device=device, dtype=dtype, template=template,
                            no_repeat_ngram_size=no_repeat_ngram_size, prompt_overflow=prompt_overflow,
                            average_all=average_all)
    settings.validate()
    specs = parse_model_specs(models)
    if not specs:
        raise ConfigError("no model given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {b: _load_benchmark(b, limit) for b in settings.benchmarks}
    print(cost_line(settings, len(specs), data, quick_hint), file=sys.stderr, flush=True)
    results: dict = {"settings": {**asdict(settings), "protocol": _protocol_note(settings),
                                  "std": "sample standard deviation over seeds (ddof=1)",
                                  "lmdistill_version": __version__},
                     "benchmarks": list(settings.benchmarks),
                     "average_over": averaged_benchmarks(settings.benchmarks, settings.average_all),
                     "benchmark_notes": {b: BENCHMARKS[b.partition(":")[0]].note for b in settings.benchmarks},
                     "models": {}}
    local = [spec for spec in specs if not spec.is_api]
    pooled = bool(local) and (executor is not None or workers > 1)
    if pooled:
        _predict_in_workers(local, settings, out, overwrite, progress, workers, executor)
    for spec in specs:
        reuse = pooled and not spec.is_api   # the workers have just written this model's seeds
        cache = None if overwrite else out / "predictions" / spec.dirname / "api_requests.jsonl"
        predictor = make_predictor(spec, device=device, dtype=dtype, api_key_env=api_key_env, cache_path=cache,
                                   template=template)
        try:
            entries = {b: evaluate_benchmark(predictor, spec, b, data[b], settings, out,
                                             overwrite=overwrite and not reuse, progress=progress and not reuse)
                       for b in settings.benchmarks}
        finally:
            _release(predictor)
        results["models"][spec.name] = {"source": spec.source, "kind": predictor.kind,
                                        "prompt": "chat template (user message)" if spec.is_api else template,
                                        "benchmarks": entries, AVERAGE: average_entry(entries, settings.seeds, results["average_over"])}
        write_reports(results, out)
    return results


def cost_line(settings: EvalSettings, n_models: int, data: dict[str, list], quick_hint: str = "") -> str:
    """What an evaluation will generate, said before it starts: models x examples (per benchmark) x seeds x samples,
    each at most ``max_new_tokens`` tokens, so at most their product of generated tokens (finished seeds found in
    the output folder are reused and cost nothing). ``quick_hint`` follows when there are several seeds or more
    than 64 new tokens."""
    examples = sum(len(v) for v in data.values())
    seeds, samples = len(settings.seeds), settings.num_samples
    per_bench = ", ".join(f"{b} {len(v)}" for b, v in data.items())
    line = (f"[eval] {n_models} model(s) x {len(data)} benchmark(s) ({per_bench} examples) x {seeds} seed(s)"
            + (f" x {samples} samples" if samples > 1 else "")
            + f" x at most {settings.max_new_tokens} new tokens: up to "
            f"{n_models * examples * seeds * samples * settings.max_new_tokens:,} generated tokens")
    if quick_hint and (seeds > 1 or settings.max_new_tokens > 64):
        line += f"; {quick_hint}"
    return line


def _weights_bytes(source: str) -> int:
    """The size of a local model folder's weight files (0 for a hub id): the order of the pool's jobs."""
    folder = Path(source)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".pt"))


def _predict_job(spec: ModelSpec, bench: str, settings: EvalSettings, out: Path, overwrite: bool) -> float:
    """One (model, benchmark) job of ``evaluate_models(workers=...)``: generate and save its seeds; its seconds."""
    t0 = time.time()
    predictor = make_predictor(spec, device=settings.device, dtype=settings.dtype, template=settings.template)
    try:
        evaluate_benchmark(predictor, spec, bench, _load_benchmark(bench, settings.limit), settings, out,
                           overwrite=overwrite, progress=False)
    finally:
        _release(predictor)
    return time.time() - t0


def _predict_in_workers(specs: list[ModelSpec], settings: EvalSettings, out: Path, overwrite: bool, progress: bool,
                        workers: int, executor) -> None:
    """Run every (model, benchmark) job in a process pool, the largest models' first (so that no long job starts
    last and leaves the other workers idle); one line per finished job."""
    from concurrent.futures import as_completed

    from lmdistill.runtime import worker_pool

    pool = executor if executor is not None else worker_pool(workers)
    try:
        jobs = {pool.submit(_predict_job, spec, bench, settings, out, overwrite): (spec, bench)
                for spec in sorted(specs, key=lambda s: -_weights_bytes(s.source)) for bench in settings.benchmarks}
        for future in as_completed(jobs):
            spec, bench = jobs[future]
            seconds = future.result()
            if progress:
                print(f"[eval] {spec.name} / {bench}: {len(settings.seeds)} seed(s) in {seconds:.0f} s", file=sys.stderr,
                      flush=True)
    finally:
        if executor is None:
            pool.shutdown(cancel_futures=True)


def _protocol_note(s: EvalSettings) -> str:
    paper = (not s.greedy and s.num_samples == 1 and s.limit is None and s.max_new_tokens == 256
             and s.max_prompt_length == 256 and (s.temperature, s.top_p, s.top_k) == (1.0, 1.0, 0)
             and list(s.seeds) == list(PROTOCOL_SEEDS) and s.template == "alpaca"
             and s.no_repeat_ngram_size == 6 and s.prompt_overflow == "truncate")
    return "MiniLLM paper protocol" if paper else "differs from the MiniLLM paper protocol"
