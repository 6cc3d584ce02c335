#!/usr/bin/env bash
# A/B two source trees in one GPU call (device time is scarce): each tarball is built (quick:
# bf16 + sm_90a unless NSA_CUDA_DTYPES / NSA_CUDA_ARCHS say otherwise), its tests matching
# EXPR run, then the same benchmark command runs against each build. Logs go to $OUT/{a,b}.
#
# Locally:   git archive main -o .snap/a.tar && git archive wip/branch -o .snap/b.tar
# On the GPU (carry [".whl", ".snap"]):
#   bash tools/gpu_ab.sh .snap/a.tar .snap/b.tar "select or cmp" "bench/bench_cmp_select.py"
# BENCH may hold several scripts with their arguments, separated by ';' (each run as python3 ...):
#   "bench/bench_decode.py;tools/ab_sel_fwd_width.py;tools/profile_nsa.py --T 65536"
# (a script path, not "python3 script").
set -uo pipefail
A=$(realpath "$1"); B=$(realpath "$2"); EXPR=${3:-}; BENCH=${4:-}
OUT=${OUT:-$PWD/gpu_out}
WHL=$(realpath .whl 2>/dev/null || true)
export NSA_CUDA_DTYPES=${NSA_CUDA_DTYPES:-bf16} NSA_CUDA_ARCHS=${NSA_CUDA_ARCHS:-90a}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CC=/usr/bin/gcc  # shared libstdc++ (see gpu_check.sh)
if [ -n "$WHL" ] && ls "$WHL"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$WHL"/*.whl
fi
for side in a b; do
  tarball=$A; [ $side = b ] && tarball=$B
  dir=/tmp/ab_$side; rm -rf "$dir"; mkdir -p "$dir" "$OUT/$side"
  tar -xf "$tarball" -C "$dir"
  (
    cd "$dir" || exit 1
    export PYTHONPATH=$dir:/tmp/site
    t0=$(date +%s)
    python3 setup.py build_ext --inplace > "$OUT/$side/build.log" 2>&1 || { echo "$side: BUILD FAILED"; tail -20 "$OUT/$side/build.log"; exit 1; }
    echo "$side: build ok in $(( $(date +%s) - t0 )) s"
    if [ -n "$EXPR" ]; then
      python3 -m pytest -q -p no:cacheprovider tests -k "$EXPR" > "$OUT/$side/tests.log" 2>&1
      echo "$side: tests rc=$? $(tail -1 "$OUT/$side/tests.log")"
    fi
    if [ -n "$BENCH" ]; then  # several scripts: separated by ';', each run as python3 <script args>
      : > "$OUT/$side/bench.log"
      IFS=';' read -ra cmds <<< "$BENCH"
      for cmd in "${cmds[@]}"; do
        echo "==== $cmd" >> "$OUT/$side/bench.log"
        OUT=$OUT/$side python3 $cmd >> "$OUT/$side/bench.log" 2>&1
        echo "$side: $cmd rc=$?"
      done
      grep -E "^\||^G=|per step|^ *[0-9.]+ ms" "$OUT/$side/bench.log" | tail -40
    fi
  )
done
