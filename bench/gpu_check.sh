#!/usr/bin/env bash
# GPU check for multi-process training: bf16 distillation of SmolLM2-135M-Instruct (teacher) into its 10-layer
# pruned student, on 1 GPU and -- when there are several -- FSDP2 over all of them
# (configs/accelerate/fsdp2.yaml). Prints tokens/s and peak GPU memory (torch.cuda.max_memory_allocated, per rank).
#
#   bench/gpu_check.sh [WORKDIR]          # default WORKDIR: runs/gpu_check
#   RECIPE=kd STEPS=50 bench/gpu_check.sh # any recipe (default gkd: on-policy, generation on gathered weights)
#
# Needs a CUDA build of torch (the Makefile installs the CPU wheel: `pip install torch` from the CUDA index first).
# Without CUDA it exits with status 2 and runs nothing. Record the printed lines in bench/README.md.
#
# CPU smoke run of the same script (tests/test_fsdp.py runs it, so it cannot rot unnoticed where no GPU is lent):
#   GPU_CHECK_CPU=2 TEACHER=DIR STUDENT=DIR STEPS=2 bench/gpu_check.sh WORKDIR
# float32 on the CPU, "1 GPU" = one process, FSDP2 = GPU_CHECK_CPU processes over gloo; the figures mean nothing.
#
#   bench/gpu_check.sh throughput [OUT]   # issue 34: bench/gpu_check.py on the lent GPU machine, at most 8 minutes
# On that machine's own Python (PY, default python3: PyTorch with CUDA, transformers, accelerate, peft, ...; no
# network) with lmdistill from this tree (PYTHONPATH=src) and the wheels of `make gpu-wheels` carried in .whl/
# (TRL, liger-kernel, datasets, dill, multiprocess), installed with --no-index --no-deps into a folder of their own.
# Writes OUT/gpu_check.json and OUT/gpu_check.md (OUT: the argument, else $OUT, else runs/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = throughput ]; then
    PY=${PY:-python3}
    OUT=${2:-${OUT:-runs/gpu_check}}
    SITE=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "gpu_check: no wheels in .whl/ (run make gpu-wheels where pip reaches PyPI, and carry .whl)" >&2
        exit 2
    fi
    pip_install() {
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"
    }
    # all at once; if that fails (a wheel for another Python), one by one: the parts that need a missing one say so
    pip_install .whl/*.whl || for w in .whl/*.whl; do
        pip_install "$w" || echo "gpu_check: could not install $w; the parts that need it will fail and say why" >&2
    done
    mkdir -p "$OUT"
    # 420 s for the parts (each time-boxed by what is left), 470 s for the whole process: under 8 minutes in all
    PYTHONPATH="src:$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
        timeout -k 10 470 "$PY" bench/gpu_check.py --out "$OUT" --budget "${BUDGET:-420}"
    exit
fi
PY=${PY:-.venv/bin/python}
WORK=${1:-runs/gpu_check}
RECIPE=${RECIPE:-gkd}
STEPS=${STEPS:-30}
BATCH=${BATCH:-16}
MICRO=${MICRO:-4}

CPU=${GPU_CHECK_CPU:-0}
if [ "$CPU" -gt 0 ]; then
    NGPU=$CPU
    PRECISION=(mixed_precision=no teacher_dtype=float32 device=cpu)
else
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
    PRECISION=(mixed_precision=bf16 teacher_dtype=bfloat16 device=auto)
fi
if [ "$NGPU" -eq 0 ]; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False with $("$PY" -c 'import torch; print(torch.__version__)')); this check needs a CUDA GPU and ran nothing" >&2
    exit 2
fi
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1
TEACHER=${TEACHER:-$WORK/teacher}
STUDENT=${STUDENT:-$WORK/student}
[ -d "$TEACHER" ] || "$PY" -m lmdistill models get smollm2-135m-instruct --out "$TEACHER"
[ -d "$STUDENT" ] || "$PY" -m lmdistill models prune "$TEACHER" --out "$STUDENT" --layers 10

COMMON=(student="$STUDENT" teacher="$TEACHER" "${PRECISION[@]}"
        max_steps="$STEPS" batch_size="$BATCH" micro_batch_size="$MICRO" save_steps=100000 eval_steps=100000
        valid_data=dolly:valid eval_limit=8 progress=false)

report() {   # $1: label, $2: output folder
    "$PY" - "$1" "$2" <<'PYEOF'
import json, sys
label, out = sys.argv[1], sys.argv[2]
rows = [json.loads(x) for x in open(f"{out}/metrics.jsonl") if x.strip()]
tok = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][-1]
res = json.load(open(f"{out}/result.json"))
peaks = ", ".join(f"{b / 2**30:.2f}" for b in res.get("cuda_peak_bytes") or []) or "n/a (no CUDA)"
print(f"gpu_check {label}: {tok:.0f} tokens/s (all ranks), peak memory per rank [GiB]: {peaks}")
PYEOF
}

CUDA_VISIBLE_DEVICES=0 "$PY" -m lmdistill train "$RECIPE" "${COMMON[@]}" output_dir="$WORK/one_gpu"
report "1 GPU, $RECIPE" "$WORK/one_gpu"
if [ "$NGPU" -gt 1 ]; then
    "$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml --num_processes "$NGPU" \
        -m lmdistill train "$RECIPE" "${COMMON[@]}" output_dir="$WORK/fsdp2"
    report "FSDP2 on $NGPU GPUs, $RECIPE" "$WORK/fsdp2"
else
    echo "gpu_check: one GPU only; FSDP2 needs several (skipped)"
fi
