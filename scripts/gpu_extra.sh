#!/usr/bin/env bash
# The optional GPU measurements, in a call of their own after scripts/gpu_check.sh (same carry:
# .whl and .data): the jv threads-per-problem sweep, the training benchmark and the training
# code's CUDA tests (tests/test_nat_*).
#   bash scripts/gpu_extra.sh                 # GPU_EXTRA_BUDGET=220 seconds in all
#   bash scripts/gpu_extra.sh train_bench     # env and install, then the named stages
# Writes summary.txt install.log extra.log sweep.json train.json nat_tests.xml to $OUT (or
# ./gpu_out_extra).
set -uo pipefail
cd "$(dirname "$0")/.." || exit
source scripts/gpu_lib.sh
export PYTHONUNBUFFERED=1 NAT_CUDA_FALLBACK=raise NAT_CUDA_TIMEOUT_S=30
ONLY=${*:+env peers install build $*}

budget_begin "${OUT:-gpu_out_extra}" "${GPU_EXTRA_BUDGET:-220}" \
  env 5 peers 5 install 20 threads_sweep 60 train_bench 90 nat_tests 40
stage env install.log bash -c 'date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; python3 --version'
carried_env
install_ext
stage threads_sweep extra.log python3 benchmarks/jv_threads_sweep.py --cols 4 8 16 --repeats 5 --json "$out/sweep.json"
stage train_bench extra.log python3 benchmarks/train_bench.py --device cuda --limit 15360 --epochs 4 --json "$out/train.json"
timeout_flags=()
python3 -c "import pytest_timeout" 2>/dev/null && timeout_flags=(--timeout 30 -o timeout_method=signal)
STAGE_SIGNAL=INT stage nat_tests extra.log python3 -m pytest -v -rs -p no:cacheprovider -p pytest_hang_guard \
  -m cuda "${timeout_flags[@]}" --junitxml="$out/nat_tests.xml" tests/test_nat_*.py
echo "total: $((SECONDS - start)) s of a ${budget} s budget" | tee -a "$summary"
python3 scripts/gpu_targets.py --train "$out/train.json" 2>&1 | tail -1 | tee -a "$summary"
