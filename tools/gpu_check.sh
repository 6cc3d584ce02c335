#!/usr/bin/env bash
# One call on the GPU machine: build the extension from source, run the CUDA tests, build and
# run the C++ benchmarks, run the Python benchmarks; logs and result tables go to $OUT.
#
#   bash tools/gpu_check.sh [--quick] [--sanitize] [--no-bench] [--tests "pytest -k expr"]
#
# --quick     build only bf16 + sm_90a (faster iteration); default is the full build
# --sanitize  also run compute-sanitizer memcheck/racecheck/synccheck on small cases
# --no-bench  skip the benchmarks; --bench NAME runs only bench_NAME* (C++ and Python)
# --long      also run the 1M-token tests (NSA_LONG_TESTS=1; minutes, ~90 GB of GPU memory)
# On sm_90 cards it also builds and runs tools/probes/*.cu (instruction-convention probes) and,
# with the benchmarks, tools/ab_wgmma_range.py, tools/ab_kernel_switch.py and tools/ab_select_sm90.py (wgmma vs sm_80 kernels
# on the same card).
# The GPU machine has no package registry: carry the nvidia-cutlass wheel in .whl/ (see README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
QUICK=0; SANITIZE=0; BENCH=1; TEST_EXPR=""; BENCH_GLOB="bench_*"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --sanitize) SANITIZE=1 ;;
    --no-bench) BENCH=0 ;;
    --long) export NSA_LONG_TESTS=1 ;;
    --tests) TEST_EXPR="$2"; shift ;;
    --bench) BENCH_GLOB="bench_$2*"; shift ;;
    *) echo "unknown flag $1"; exit 2 ;;
  esac
  shift
done
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build of nsa_cuda
PY=${PYTHON:-python3}
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
summary "card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
summary "torch: $($PY -c 'import torch;print(torch.__version__, torch.version.cuda)')"

# ---- build the extension (in place) ----
# Pick a C++ compiler that links libstdc++ dynamically: an extension carrying its own static
# copy next to torch's shared one crashed on the first formatted error message (seen with
# /opt/gcc 13.3 on the GPU image). `-print-file-name` returns a full path only if the .so exists.
for c in ${CXX:-} /usr/bin/g++ /opt/gcc/bin/g++ g++ c++; do
  command -v "$c" >/dev/null 2>&1 || continue
  if [ -e "$("$c" -print-file-name=libstdc++.so 2>/dev/null)" ]; then
    export CXX=$(command -v "$c"); cc_dir=$(dirname "$CXX"); [ -x "$cc_dir/gcc" ] && export CC=$cc_dir/gcc
    break
  fi
done
summary "compilers: CXX=${CXX:-default} CC=${CC:-default}"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ $QUICK = 1 ]; then export NSA_CUDA_ARCHS=90a NSA_CUDA_DTYPES=bf16; fi
t0=$(date +%s)
if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  summary "BUILD FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1
fi
summary "build: ok in $(( $(date +%s) - t0 )) s"
grep -E "[1-9][0-9]* bytes spill" "$OUT/build.log" | head -5
$PY -c 'import nsa_cuda; print(nsa_cuda.build_info())' | tee -a "$OUT/summary.txt"
ldd nsa_cuda/_C*.so | grep -q 'libstdc++' || summary "WARNING: _C links libstdc++ statically"

# ---- tests: everything (CPU tests too) ----
t0=$(date +%s)
$PY -X faulthandler -m pytest -q -p no:cacheprovider -rfE tests ${TEST_EXPR:+-k "$TEST_EXPR"} > "$OUT/tests.log" 2>&1
rc=$?
summary "tests: rc=$rc in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/tests.log")"
[ $rc = 0 ] || { grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20; grep -A25 "Fatal Python error" "$OUT/tests.log" | head -40; }

# ---- probes of instruction conventions (tools/probes/*.cu: standalone, print PASS / FAIL) ----
if nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | grep -q '^9\.0'; then
  for f in tools/probes/*.cu; do
    [ -e "$f" ] || continue
    exe=/tmp/$(basename "$f" .cu)
    if "$CUDA_HOME/bin/nvcc" -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a "$f" -o "$exe" >> "$OUT/build.log" 2>&1; then
      "$exe" > /tmp/probe_one.log 2>&1; prc=$?
      cat /tmp/probe_one.log >> "$OUT/tests.log"
      summary "probe $(basename "$f"): rc=$prc $(grep -c PASS /tmp/probe_one.log) PASS, $(grep -c FAIL /tmp/probe_one.log) FAIL"
    else
      summary "probe $(basename "$f"): BUILD FAILED (see build.log)"
    fi
  done
fi

# ---- C++ benchmarks (CMake, torch-free kernel library) ----
if [ $BENCH = 1 ]; then
  archs=90a; [ $QUICK = 1 ] || archs="80;90a"
  : > "$OUT/bench.log"
  if ! ls bench/cpp/$BENCH_GLOB.cu >/dev/null 2>&1; then
    echo "no C++ benchmark matches $BENCH_GLOB: skipping the CMake build"
  elif cmake -S . -B build-cmake -G Ninja -DCMAKE_CUDA_ARCHITECTURES="$archs" >> "$OUT/build.log" 2>&1 \
     && cmake --build build-cmake -j "$MAX_JOBS" >> "$OUT/build.log" 2>&1; then
    for b in build-cmake/$BENCH_GLOB; do
      [ -x "$b" ] || continue
      echo "==== $b" >> "$OUT/bench.log"
      "$b" > /tmp/bench_one.log 2>&1; brc=$?
      cat /tmp/bench_one.log >> "$OUT/bench.log"
      summary "$(basename "$b"): rc=$brc"; cat /tmp/bench_one.log
    done
  else
    summary "CMAKE BUILD FAILED"; tail -20 "$OUT/build.log"
  fi
  for b in bench/$BENCH_GLOB.py; do
    [ -f "$b" ] || continue
    echo "==== $b" >> "$OUT/bench.log"
    NSA_BENCH_T=${NSA_BENCH_T:-} $PY "$b" > /tmp/bench_one.log 2>&1; brc=$?
    cat /tmp/bench_one.log >> "$OUT/bench.log"
    summary "$(basename "$b"): rc=$brc"; tail -25 /tmp/bench_one.log
  done
  # sm_90 cards: the wgmma kernels against the sm_80 ones on the same card (one process)
  if [ "$BENCH_GLOB" = "bench_*" ] && nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | grep -q '^9\.0'; then
    for ab in tools/ab_wgmma_range.py tools/ab_kernel_switch.py tools/ab_select_sm90.py; do
      echo "==== $ab" >> "$OUT/bench.log"
      $PY "$ab" > /tmp/bench_one.log 2>&1; brc=$?
      cat /tmp/bench_one.log >> "$OUT/bench.log"
      summary "$(basename "$ab"): rc=$brc"; cat /tmp/bench_one.log
    done
  fi
fi

# ---- memory safety on small shapes ----
if [ $SANITIZE = 1 ]; then
  : > "$OUT/sanitize.log"
  for tool in memcheck racecheck synccheck; do
    echo "==== $tool" >> "$OUT/sanitize.log"
    compute-sanitizer --tool $tool --error-exitcode 9 $PY tools/sanitize_cases.py >> "$OUT/sanitize.log" 2>&1
    summary "compute-sanitizer $tool: rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitize.log" | tail -1)"
  done
fi
echo "==== summary ===="; cat "$OUT/summary.txt"
