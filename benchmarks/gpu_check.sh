#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU (H100 / H200; torch with CUDA, triton, nvcc, cmake,
# ninja, pybind11, scikit-build-core, pytest, pytest-benchmark installed; no package registry needed).
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh        # from the repository root; OUT defaults to ./gpu_out
#
# Within DEADLINE_SECONDS it: names the GPU, builds flashstep with its CUDA kernels (sm_90), prints
# `flashstep info`, runs the op tests on the GPU (the @gpu model-shape tests, then the ordinary tests,
# which run every backend on CUDA tensors), times a small set of pipeline benchmarks (OSEDiff and SD-Turbo
# at 512², RRDBNet 512 -> 2048, full configs, fp16, no torch.compile; the diffusers/peft/spandrel peers run
# where those packages are installed), times the op benchmarks, and writes $OUT/summary.txt: the GPU, the
# commit, every step's outcome, the test counts, a table per op and pipeline, and the performance targets.
# Each step has its own timeout, and a failed or timed-out step does not stop the ones after it.
# The benchmark files share the time left after the tests, each skipping its remaining cases when its
# share is spent (the cases named by targets run first).
#
# $OUT receives 7 files: summary.txt, steps.log, environment.log, build.log, tests.log, bench.log,
# bench_ops.json (all benchmarks, ops and pipelines, pytest-benchmark JSON).
set -uo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

DEADLINE_SECONDS=355
SUMMARY_RESERVE_SECONDS=15
# A step past its limit gets SIGINT (pytest then stops and still writes its report and benchmark JSON),
# and SIGKILL this many seconds later.
KILL_AFTER_SECONDS=15
# Of each benchmark file's time, what its cases may not use: python start, imports, the CUDA context,
# the case still running when the budget ends, writing the JSON.
BENCH_FILE_GRACE_SECONDS=25
# The share of the benchmark time each file gets, in percent (attention and conv2d carry the most
# cases), but at least BENCH_FILE_MIN_SECONDS while time is left: when time is short, the files that come
# first (those with targets) run and the last ones do not.
BENCH_FILE_MIN_SECONDS=40
BENCH_SHARES=(attention:25 group_norm:15 conv2d:22 pixel_shuffle:16 linear:11 geglu:11)
# The pipeline benchmarks: their cases and the seconds they may take (random full-config weights are built on
# the GPU in seconds; each case times flashstep after a warm-up, and its peers where they are installed).
PIPELINE_BENCH_FILES=(benchmarks/bench_osediff.py benchmarks/bench_sd_turbo.py benchmarks/bench_rrdbnet.py)
PIPELINE_BENCH_SELECTION="not compile and (512px or rrdbnet)"
PIPELINE_BENCH_SECONDS=70

START=$(date +%s)
DEADLINE=$((START + DEADLINE_SECONDS))
PY="$(command -v python || command -v python3)"
STEPS="$OUT/steps.log"
: >"$STEPS"

seconds_left() { echo $((DEADLINE - SUMMARY_RESERVE_SECONDS - $(date +%s))); }

record() {  # record NAME STATUS SECONDS LOG
  printf '%-22s %-30s %5ss   %s\n' "$1" "$2" "$3" "$(basename "$4")" | tee -a "$STEPS"
}

run_step() {  # run_step NAME MAX_SECONDS LOG COMMAND...: its output goes to LOG and to $WORK/NAME.log
  local name=$1 max=$2 log=$3
  shift 3
  local left limit started rc status
  left=$(($(seconds_left) - KILL_AFTER_SECONDS))
  limit=$((max < left ? max : left))
  if ((limit < 5)); then
    record "$name" "not run: no time left" 0 "$log"
    return 1
  fi
  printf '\n== %s (limit %ss, %s)\n$ %s\n' "$name" "$limit" "$(date +%T)" "$*" >>"$log"
  started=$(date +%s)
  timeout --signal=INT --kill-after="$KILL_AFTER_SECONDS" "$limit" "$@" 2>&1 | tee "$WORK/$name.log" >>"$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  record "$name" "$status" $(($(date +%s) - started)) "$log"
  return "$rc"
}

test_counts() {  # test_counts NAME: pytest's final line, or the counts so far when it was cut short
  local log="$WORK/$1.log" last
  [[ -f $log ]] || { echo "not run"; return; }
  last=$(grep -E '^(=+ )?(no tests ran|[0-9]+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)).* in [0-9.]+s' \
    "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
  if [[ -n $last ]]; then
    echo "$last"
  else
    echo "cut short; so far: $(grep -Eo ' (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)' "$log" | sort | uniq -c |
      awk '{printf "%s%s %s", sep, $1, tolower($2); sep=", "}')"
  fi
}

# 1. The GPU.
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
GPU_NAME="${GPU_NAME:-unknown (nvidia-smi failed)}"
echo "GPU: $GPU_NAME"
run_step gpu 20 "$OUT/environment.log" \
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
run_step nvidia-smi 20 "$OUT/environment.log" nvidia-smi

# 2. Build with the CUDA kernels. Without a build, the tests and benchmarks still run the Python and
# Triton paths from the source tree.
if ! run_step build 150 "$OUT/build.log" env FLASHSTEP_CUDA=ON FLASHSTEP_CUDA_ARCHS=90 \
  "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi

# 3. What was built and what runs.
run_step info 30 "$OUT/environment.log" "$PY" -m flashstep info

# 4. The op tests on the GPU.
run_step tests-gpu 45 "$OUT/tests.log" "$PY" -m pytest tests/ops tests/runner -m gpu -v -rfE -p no:cacheprovider
run_step tests-ops 75 "$OUT/tests.log" "$PY" -m pytest tests/ops -m "not gpu" -v -rfE -p no:cacheprovider

# 5. The pipeline benchmarks.
run_step bench-pipelines "$PIPELINE_BENCH_SECONDS" "$OUT/bench.log" \
  "$PY" -m pytest "${PIPELINE_BENCH_FILES[@]}" -q -rsfE -p no:cacheprovider -k "$PIPELINE_BENCH_SELECTION" \
  --benchmark-json "$WORK/bench_pipelines.json" --benchmark-columns min,median,max,rounds \
  --budget-per-file $(((PIPELINE_BENCH_SECONDS - BENCH_FILE_GRACE_SECONDS) / ${#PIPELINE_BENCH_FILES[@]}))

# 6. The op benchmarks, one file at a time, sharing the time that is left.
shares_left=0
for entry in "${BENCH_SHARES[@]}"; do shares_left=$((shares_left + ${entry#*:})); done
for entry in "${BENCH_SHARES[@]}"; do
  op=${entry%%:*}
  share=${entry#*:}
  left=$(($(seconds_left) - KILL_AFTER_SECONDS))
  file_seconds=$((left * share / shares_left))
  file_seconds=$((file_seconds > BENCH_FILE_MIN_SECONDS ? file_seconds : BENCH_FILE_MIN_SECONDS))
  file_seconds=$((file_seconds < left ? file_seconds : left))
  shares_left=$((shares_left - share))
  if ((file_seconds < BENCH_FILE_GRACE_SECONDS + 5)); then
    record "bench-$op" "not run: no time left" 0 "$OUT/bench.log"
    continue
  fi
  run_step "bench-$op" "$file_seconds" "$OUT/bench.log" \
    "$PY" -m pytest "benchmarks/bench_$op.py" -q -rsfE -p no:cacheprovider \
    --benchmark-json "$WORK/bench_$op.json" --benchmark-max-time 0.1 --benchmark-min-rounds 10 \
    --benchmark-columns min,median,max,rounds --budget-per-file $((file_seconds - BENCH_FILE_GRACE_SECONDS))
done

# 7. The summary.
COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
if [[ $COMMIT != unknown && -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
  COMMIT="$COMMIT+dirty"
fi
shopt -s nullglob
bench_files=("$WORK"/bench_*.json)
if ((${#bench_files[@]})); then
  "$PY" benchmarks/summarize.py "${bench_files[@]}" --merged "$OUT/bench_ops.json" >"$WORK/benchmarks.txt" 2>&1 ||
    echo "(summarize.py failed; see above)" >>"$WORK/benchmarks.txt"
else
  echo "no benchmark results: every benchmark step failed (see bench.log)" >"$WORK/benchmarks.txt"
fi
{
  echo "flashstep GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(($(date +%s) - START)) s"
  echo "GPU: $GPU_NAME"
  echo "commit: $COMMIT"
  echo
  echo "steps (name, outcome, seconds, log):"
  sed 's/^/  /' "$STEPS"
  echo
  echo "tests:"
  echo "  @gpu model-shape tests: $(test_counts tests-gpu)"
  echo "  ordinary op tests:      $(test_counts tests-ops)"
  failures=$(cat "$WORK"/tests-*.log 2>/dev/null | grep -E '^(FAILED|ERROR) ' | head -40 | sed 's/^/    /')
  if [[ -n $failures ]]; then
    echo "  failures (first 40):"
    echo "$failures"
  fi
  echo
  cat "$WORK/benchmarks.txt"
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
