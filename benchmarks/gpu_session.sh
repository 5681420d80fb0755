#!/usr/bin/env bash
# Everything a GPU machine should run, in one go, within one time budget: build, selftest, the
# GPU tests, the rest of the suite, and the GPU benchmarks. Each step writes one file under $OUT
# (default benchmarks/results/gpu-run); a failed step is reported and the next still runs.
#
#   OUT=/tmp/out BUDGET_S=540 bash benchmarks/gpu_session.sh
#
# A lent GPU machine gives a session a few minutes of device time in all, so the steps run most
# valuable first (the kernels' correctness on a real GPU before any speed), each limited to what
# is left of BUDGET_S (default 540 s, under a device call's 600 s), and the tests list every
# failure instead of stopping at the first: a first run on a GPU should say all that is wrong.
# Then fix what failed, and record the tables in benchmarks/results/<gpu>-*.md naming the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu-run}
deadline=$((SECONDS + ${BUDGET_S:-540}))
mkdir -p "$out"
failed=()

step() {  # step NAME SECONDS COMMAND...: runs COMMAND, at most SECONDS or what is left, into $out/NAME.txt
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS))
  if ((left < 10)); then
    echo "== $name: not run (time budget spent)"
    failed+=("$name(not run)")
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (${limit}s at most): $*"
  if ! timeout "$limit" "$@" >"$out/$name.txt" 2>&1; then
    failed+=("$name")
    tail -n 20 "$out/$name.txt"
  fi
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
# Only this GPU's architecture: half the compile of the default list.
arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
step build 240 env MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="$arch" \
  pip install --no-build-isolation --no-deps -e .
step info 30 python -m fastopt info
step selftest 60 python -m fastopt selftest
step tests-gpu 150 python -m pytest tests -q -p no:cacheprovider --maxfail=100 \
  -k "cuda or gpu or triton" --durations=10
step bench-optimizers 90 python -m fastopt bench --device cuda --features optimizers,precision \
  --repeats 5
# (The block-sparse benchmark's anchors are the CPU's: it has no GPU table yet.)
step bench-int8 90 python -m fastopt bench --device cuda --features int8 --repeats 5
step tests-rest 120 python -m pytest tests -q -p no:cacheprovider --maxfail=100 \
  -k "not (cuda or gpu or triton)"

echo "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all steps passed; results in $out"
