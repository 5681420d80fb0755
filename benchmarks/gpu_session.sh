#!/usr/bin/env bash
# Everything a GPU machine should run, in one go and in under 10 minutes: build, selftest, the
# whole test suite with the GPU visible, and the GPU benchmarks. Each step writes one file under
# $OUT (default benchmarks/results/gpu-run); a failed step is reported and the next still runs.
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh
#
# Then fix what failed, and record the tables in benchmarks/results/<gpu>-*.md naming the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$out"
failed=()

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit into $out/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  if ! timeout "$limit" "$@" >"$out/$name.txt" 2>&1; then
    failed+=("$name")
    tail -n 20 "$out/$name.txt"
  fi
}

step build 300 env MAX_JOBS="$(nproc)" pip install --no-build-isolation --no-deps -e .
step info 30 python -m fastopt info
step selftest 120 python -m fastopt selftest
step tests 420 python -m pytest tests -q -p no:cacheprovider -x --durations=15
step bench-optimizers 240 python -m fastopt bench --device cuda --repeats 5
step bench-layers 240 python -m pytest benchmarks/test_int8_linear.py \
  benchmarks/test_blocksparse_linear.py -q -p no:cacheprovider --benchmark-json "$out/layers.json"

echo "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all steps passed; results in $out"
