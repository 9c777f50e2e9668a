#!/usr/bin/env bash
# The whole GPU check in one command, for a lent GPU's short time (prepare it first here with
# scripts/prepare_gpu_carry.sh, and carry .whl and .data):
#   bash scripts/gpu_check.sh          # GPU_CHECK_BUDGET=540 seconds in all, build included
# Stages, most valuable first, each under `timeout` and cut to the time left; a failed stage
# does not stop the later ones: environment + build; a smoke run of every kernel path
# (CUDA_LAUNCH_BLOCKING=1, dual certificates); the CUDA tests (per-test timeout);
# compute-sanitizer memcheck on the small smoke cases; the GPU benchmark (CUDA events, JSON
# written after each case); the jv threads-per-problem sweep; the training benchmark; racecheck
# and synccheck; ncu on the B=1 NAT case and the 4096 auction repair. If the smoke run hangs,
# the later GPU stages are skipped (they would wait out their limits on the same hang). Ends
# with a PASS/MISS table of the targets of issue 8. Writes 8 flat files to $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
budget=${GPU_CHECK_BUDGET:-540}
start=$SECONDS
stages="$out/summary.txt"
: > "$stages"
hung=0

# stage NAME LIMIT LOG CMD...: runs CMD under timeout (at most the time left), appends to LOG.
stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((budget - (SECONDS - start)))
  if ((left < 15)); then
    echo "stage $name: skipped (budget spent)" | tee -a "$stages"
    return
  fi
  if ((hung)) && [ "$name" != build ]; then
    echo "stage $name: skipped (the smoke run hung)" | tee -a "$stages"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s)" >> "$out/$log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >> "$out/$log" 2>&1
  local rc=$?
  echo "stage $name: rc=$rc in $((SECONDS - t0))s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')" |
    tee -a "$stages"
  if [ "$name" = smoke ] && ((rc == 124 || rc == 137)); then hung=1; fi
}

if compgen -G ".whl/*.whl" > /dev/null; then  # peers missing there
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d .data/fashion-mnist ] && export NAT_FASHION_MNIST_DIR=$PWD/.data/fashion-mnist

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  nvcc --version | tail -2
  python3 -c "import torch; p = torch.cuda.get_device_properties(0); print(f'torch {torch.__version__}, {p.name}, {p.multi_processor_count} SMs, L2 {p.L2_cache_size >> 20} MiB, sm_{p.major}{p.minor}')"
} >> "$out/build.log" 2>&1
stage build 240 build.log env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAX_JOBS="${MAX_JOBS:-16}" python3 setup.py build_ext --inplace
echo "C++ standard passed to the compilers: $(grep -o -- '-std=c++[0-9]*' "$out/build.log" | sort | uniq -c | tr '\n' ' ')" >> "$out/build.log"

stage smoke 120 smoke.log env CUDA_LAUNCH_BLOCKING=1 python3 scripts/gpu_smoke.py
# The thread method interrupts a test blocked in a CUDA sync (the signal method cannot); -v and
# the durations name the test that hung or ate the time.
timeout_flags=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120 --timeout-method=thread")
stage tests 200 tests.log python3 -m pytest -v -rs -p no:cacheprovider -m cuda $timeout_flags --durations=25 \
  --junitxml="$out/cuda_tests.xml" tests
# No caching allocator under the sanitizer: else an overrun lands in a larger cached block and
# goes unseen. (racecheck sees shared memory only.)
stage sanitizer-memcheck 60 profile.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
  --print-limit 20 --error-exitcode 1 python3 scripts/gpu_smoke.py --small
stage bench 150 bench.log python3 benchmarks/assign_bench.py --device cuda --repeats 10 --json "$out/gpu.json"
stage threads_sweep 60 bench.log python3 benchmarks/jv_threads_sweep.py --cols 4 8 16 --repeats 5
stage train_bench 90 bench.log python3 benchmarks/train_bench.py --device cuda --limit 15360 --epochs 4 --json /tmp/train_bench.json
for tool in racecheck synccheck; do
  stage "sanitizer-$tool" 45 profile.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
    --print-limit 20 --error-exitcode 1 python3 scripts/gpu_smoke.py --small
done
ncu_args=(--clock-control none --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats
          --section WarpStateStats --section SchedulerStats)
stage ncu-nat-b1 45 profile.log ncu "${ncu_args[@]}" --kernel-name regex:block_lsap_kernel python3 scripts/gpu_smoke.py --case nat_b1
stage ncu-repair-4096 45 profile.log ncu "${ncu_args[@]}" --kernel-name regex:auction_repair_kernel python3 scripts/gpu_smoke.py --case auction_4096

echo "total: $((SECONDS - start))s of a ${budget}s budget" | tee -a "$stages"
python3 scripts/gpu_targets.py --bench "$out/gpu.json" --train /tmp/train_bench.json \
  --tests "$out/cuda_tests.xml" --smoke "$out/smoke.log" 2>&1 | tee -a "$stages"
