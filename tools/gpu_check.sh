#!/usr/bin/env bash
# One call on the GPU machine: build the extension from source, run the CUDA tests, build and
# run the C++ benchmarks, run the Python benchmarks; logs and result tables go to $OUT.
#
#   bash tools/gpu_check.sh [--quick] [--sanitize] [--no-bench] [--tests "pytest -k expr"]
#
# --quick     build only bf16 + sm_90a (faster iteration); default is the full build
# --sanitize  also run compute-sanitizer memcheck/racecheck/synccheck on small cases
# --no-bench  skip the benchmarks
# The GPU machine has no package registry: carry the nvidia-cutlass wheel in .whl/ (see README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
QUICK=0; SANITIZE=0; BENCH=1; TEST_EXPR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --sanitize) SANITIZE=1 ;;
    --no-bench) BENCH=0 ;;
    --tests) TEST_EXPR="$2"; shift ;;
    *) echo "unknown flag $1"; exit 2 ;;
  esac
  shift
done
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
summary "card: $(head -1 "$OUT/gpu.txt")"
summary "torch: $($PY -c 'import torch;print(torch.__version__, torch.version.cuda)')"

# ---- build the extension (in place) ----
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ $QUICK = 1 ]; then export NSA_CUDA_ARCHS=90a NSA_CUDA_DTYPES=bf16; fi
t0=$(date +%s)
if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  summary "BUILD FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1
fi
summary "build: ok in $(( $(date +%s) - t0 )) s ($(grep -c 'warn-spills\|bytes spill' "$OUT/build.log" || true) spill lines)"
grep -E "spill (stores|loads)" "$OUT/build.log" | grep -v " 0 bytes spill" | head -5
$PY -c 'import nsa_cuda; print(nsa_cuda.build_info())' | tee -a "$OUT/summary.txt"

# ---- tests: everything (CPU tests too) ----
t0=$(date +%s)
$PY -m pytest -q -x -p no:cacheprovider tests ${TEST_EXPR:+-k "$TEST_EXPR"} > "$OUT/tests.log" 2>&1
rc=$?
summary "tests: rc=$rc in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/tests.log")"
[ $rc = 0 ] || grep -E "^(FAILED|ERROR)|Error" "$OUT/tests.log" | head -20

# ---- C++ benchmarks (CMake, torch-free kernel library) ----
if [ $BENCH = 1 ]; then
  archs=90a; [ $QUICK = 1 ] || archs="80;90a"
  if cmake -S . -B build-cmake -G Ninja -DCMAKE_CUDA_ARCHITECTURES="$archs" > "$OUT/cmake.log" 2>&1 \
     && cmake --build build-cmake -j "$MAX_JOBS" >> "$OUT/cmake.log" 2>&1; then
    for b in build-cmake/bench_*; do
      "$b" > "$OUT/$(basename "$b").log" 2>&1; brc=$?
      summary "$(basename "$b"): rc=$brc"; cat "$OUT/$(basename "$b").log"
    done
  else
    summary "CMAKE BUILD FAILED"; tail -20 "$OUT/cmake.log"
  fi
  for b in bench/bench_*.py; do
    $PY "$b" > "$OUT/$(basename "$b" .py).log" 2>&1; brc=$?
    summary "$(basename "$b"): rc=$brc"; tail -25 "$OUT/$(basename "$b" .py).log"
  done
fi

# ---- memory safety on small shapes ----
if [ $SANITIZE = 1 ]; then
  for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 $PY tools/sanitize_cases.py > "$OUT/sanitize_$tool.log" 2>&1
    summary "compute-sanitizer $tool: rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
  done
fi
echo "==== summary ===="; cat "$OUT/summary.txt"
