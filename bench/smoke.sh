#!/usr/bin/env bash
# `make bench-smoke` (CI runs it): every benchmark in bench/ in its quick mode, so none can rot unnoticed.
#
#   PY=.venv/bin/python JOBS=2 bash bench/smoke.sh [NAME ...]     # NAME: a script's name (losses.py), default all
#
# Runs the scripts JOBS at a time (default 2, the machine's cores; longest first), each with one torch thread, its
# output in a log of its own; prints each script's wall and CPU seconds (user + system, its children included) and
# the total, then the end of the log of every script that failed (the logs then stay), and exits 1 if any did.
# A bench/*.py not listed here fails the run (helpers, named bench_*.py, run inside the scripts that import them).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
JOBS=${JOBS:-2}
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/bench-smoke.XXXXXX")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 BENCH_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore

# longest first (CPU seconds on the 2-core machine, bench/README.md "Quick mode")
SCRIPTS=(
    "gpu_check.py --cpu-smoke --out $LOGS/gpu_check"
    "demo_time.py --quick"
    "losses.py --quick"
    "teacher_cache.py --quick"
    "train.py --quick"
    "server_limits.py --quick"
    "denormal.py --quick"
    "serve_throughput.py --quick"
    "opd_served.py --quick"
    "cross_tokenizer.py --quick"
    "quantify_ice.py --quick"
    "generation.py --quick"
    "mgsr_terms.py --quick"
    "switch_fraction.py --quick"
)

missing=0
for f in bench/*.py; do
    name=$(basename "$f")
    case $name in bench_*) continue ;; esac
    if ! printf '%s\n' "${SCRIPTS[@]}" | grep -q "^$name "; then
        echo "bench-smoke: $f has no quick run in bench/smoke.sh" >&2
        missing=1
    fi
done
[ "$missing" -eq 0 ] || exit 1

run_one() {   # $1: "script.py args..."; writes LOGS/script.log and LOGS/script.time ("wall user sys")
    local name=${1%% *}
    local TIMEFORMAT='%R %U %S'
    # shellcheck disable=SC2086  # the arguments are words by design
    { time "$PY" bench/$1 >"$LOGS/$name.log" 2>&1; } 2>"$LOGS/$name.time"
    local rc=$?
    echo "$rc" >"$LOGS/$name.rc"
    read -r wall user sys <"$LOGS/$name.time"
    local status=ok
    [ "$rc" -eq 0 ] || status="FAILED ($rc)"
    printf 'bench-smoke: %-20s %s  %6.1f s wall  %6.1f s CPU\n' "$name" "$status" "$wall" \
        "$(awk "BEGIN {print $user + $sys}")"
}

selected=()
for entry in "${SCRIPTS[@]}"; do
    name=${entry%% *}
    if [ $# -eq 0 ] || printf '%s\n' "$@" | grep -qx "$name"; then selected+=("$entry"); fi
done
echo "bench-smoke: ${#selected[@]} scripts, $JOBS at a time, logs in $LOGS ($(uptime | sed 's/.*load/load/'))"
start=$(date +%s.%N)
for entry in "${selected[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    run_one "$entry" &
done
wait
total=$(awk "BEGIN {print $(date +%s.%N) - $start}")

failed=0
for entry in "${selected[@]}"; do
    name=${entry%% *}
    if [ "$(cat "$LOGS/$name.rc" 2>/dev/null || echo 1)" -ne 0 ]; then
        failed=$((failed + 1))
        echo "---- bench/$name failed; the end of its log ($LOGS/$name.log):" >&2
        tail -n 30 "$LOGS/$name.log" >&2
    fi
done
cpu=$(cat "$LOGS"/*.time | awk '{s += $2 + $3} END {printf "%.0f", s}')
printf 'bench-smoke: %d scripts in %.0f s wall, %s CPU-s (%s)\n' "${#selected[@]}" "$total" "$cpu" \
    "$(uptime | sed 's/.*load/load/')"
echo "bench-smoke: $(( ${#selected[@]} - failed )) passed, $failed failed"
[ "$failed" -eq 0 ] && rm -rf "$LOGS"   # the logs of a failed run stay, for reading
