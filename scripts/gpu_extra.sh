#!/usr/bin/env bash
# The optional GPU measurements, in a call of their own after scripts/gpu_check.sh (same carry:
# .whl and .data): the jv threads-per-problem sweep, the training benchmark, the training
# code's CUDA tests (tests/test_nat_*) and the whole-dataset assignment on the GPU (issue 24:
# assign_full's CUDA tests, then n = 262,144 x 64 spread and crowded, passes on the GPU and
# the sparse solve on the host, per-phase times in full_assign.json).
#   bash scripts/gpu_extra.sh                 # GPU_EXTRA_BUDGET=420 seconds in all
#   bash scripts/gpu_extra.sh train_bench     # env and install, then the named stages
# Writes summary.txt install.log extra.log sweep.json train.json nat_tests.xml full_assign.json
# to $OUT (or
# ./gpu_out_extra).
set -uo pipefail
cd "$(dirname "$0")/.." || exit
source scripts/gpu_lib.sh
export PYTHONUNBUFFERED=1 NAT_CUDA_FALLBACK=raise NAT_CUDA_TIMEOUT_S=30
ONLY=${*:+env peers install build $*}

budget_begin "${OUT:-gpu_out_extra}" "${GPU_EXTRA_BUDGET:-420}" \
  env 5 peers 5 install 20 threads_sweep 60 train_bench 90 nat_tests 40 full_assign 200
stage env install.log bash -c 'date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; python3 --version'
carried_env
install_ext
stage threads_sweep extra.log python3 benchmarks/jv_threads_sweep.py --cols 4 8 16 --repeats 5 --json "$out/sweep.json"
stage train_bench extra.log python3 benchmarks/train_bench.py --device cuda --limit 15360 --epochs 4 --json "$out/train.json"
timeout_flags=()
python3 -c "import pytest_timeout" 2>/dev/null && timeout_flags=(--timeout 30 -o timeout_method=signal)
STAGE_SIGNAL=INT stage nat_tests extra.log python3 -m pytest -v -rs -p no:cacheprovider -p pytest_hang_guard \
  -m cuda "${timeout_flags[@]}" --junitxml="$out/nat_tests.xml" tests/test_nat_*.py
stage full_assign extra.log bash -c "python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_assign_full.py \
  && for kind in spread crowded; do python3 benchmarks/full_assign_scale.py phases --rows 262144 --kind \$kind \
  --device cuda >> '$out/full_assign.json' || exit 1; done"
echo "total: $((SECONDS - start)) s of a ${budget} s budget" | tee -a "$summary"
python3 scripts/gpu_targets.py --train "$out/train.json" 2>&1 | tail -1 | tee -a "$summary"
