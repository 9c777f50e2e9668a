#!/usr/bin/env bash
# The GPU check in one command, sized for a lent GPU's 15 minutes of device time: a machine start
# (1-2 min), this script (GPU_CHECK_BUDGET, 420 s), and one rerun of a failed stage still fit.
# Prepare it here first with scripts/prepare_gpu_carry.sh, and carry .whl and .data:
#   bash scripts/gpu_check.sh                 # every stage
#   bash scripts/gpu_check.sh smoke-coop      # a rerun: env and install, then the named stages
# Stages, in order, each under `timeout` at its limit (cut to the time left); a failed stage does
# not stop the later ones:
#   env, install   the GPU, driver, nvcc; the carried wheel's compiled module, checked (CUDA
#                  kernels registered, a 3x3 solved on the GPU); a build from source only if the
#                  wheel fails or was built from other sources (then later stages get less time)
#   smoke-*        scripts/gpu_smoke.py, one process a solver path (jv, block auction,
#                  cooperative auction), each checked bit for bit against the host team run;
#                  a path that hangs is left out of every later smoke-style stage and the benchmark
#   synccheck, racecheck, memcheck
#                  compute-sanitizer on the small cases (gpu_smoke.py --small: torch and nat_ext
#                  only), caching allocator off; each run prints its start-up times
#   bench          benchmarks/assign_bench.py: GPU solvers first, CPU peers timed once, JSON
#                  written after each solver
#   tests          the CUDA op tests (-m cuda, not tests/test_nat_*), 60 s a test (pytest-timeout,
#                  signal method), stopped at the first hang by scripts/pytest_hang_guard.py and
#                  at the stage limit by SIGINT, so pytest still writes its JUnit XML
#   ncu            Nsight Compute on the B=1 NAT step's jv kernel and the 4096 auction's repair
#   summary        the stage lines, hangs, start-up times, the cooperative launch's blocks per SM,
#                  sanitizer error counts, and the PASS/MISS table of the GPU targets
# Every stage runs with NAT_CUDA_FALLBACK=raise, so a GPU failure raises rather than being
# re-solved on the CPU, and NAT_CUDA_TIMEOUT_S set, so a hung kernel becomes a recorded error.
# Writes 8 flat files to $OUT (or ./gpu_out): summary.txt install.log smoke.log tools.log
# bench.log gpu.json tests.log cuda_tests.xml. The threads sweep, train_bench and the training
# code's CUDA tests are in scripts/gpu_extra.sh.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
source scripts/gpu_lib.sh
export PYTHONUNBUFFERED=1 NAT_CUDA_FALLBACK=raise
ONLY=${*:+env peers install build $* summary}

# Stage limits in seconds, in the order they run; budget_begin prints them with their sum and
# refuses to start if the sum is over the budget.
budget_begin "${OUT:-gpu_out}" "${GPU_CHECK_BUDGET:-420}" \
  env 5 peers 5 install 20 \
  smoke-jv 30 smoke-block-auction 20 smoke-coop-auction 30 \
  synccheck 45 racecheck 60 memcheck 45 \
  bench 60 tests 65 ncu 30 summary 5
stage env install.log bash -c 'date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv; nvcc --version | tail -2; python3 --version'
carried_env
install_ext

# One process a solver path: torch starts three times, and a hang costs only its path. The
# cooperative launch prints its blocks per SM (NAT_CUDA_VERBOSE).
hung=()
for path in jv block_auction coop_auction; do
  NAT_CUDA_TIMEOUT_S=10 NAT_CUDA_VERBOSE=1 CUDA_LAUNCH_BLOCKING=1 \
    stage "smoke-${path/_/-}" smoke.log python3 scripts/gpu_smoke.py --path "$path"
  [[ "$stage_rc" =~ ^(3|124|137)$ ]] && hung+=("$path")
done
skip_paths=()
for path in "${hung[@]}"; do skip_paths+=(--skip-path "$path"); done
# The benchmark rows each hung path runs (solver="auto" takes jv except on the 4096x4096 case).
declare -A bench_rows=([jv]='solver=jv|^(batch|assign).*nat (assign )?cuda$'
                       [block_auction]='^(batch|assign).*solver=auction'
                       [coop_auction]='^4096x4096.*(nat cuda$|solver=auction)')
skip_re=""
for path in "${hung[@]}"; do skip_re+="${skip_re:+|}(${bench_rows[$path]})"; done

# No caching allocator under the sanitizer: else an overrun lands in a larger cached block and
# goes unseen. (racecheck sees shared memory only.) The small set's kernels run 10-100x slower.
for tool in synccheck racecheck memcheck; do
  NAT_CUDA_TIMEOUT_S=50 NAT_CUDA_VERBOSE=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    stage "$tool" tools.log compute-sanitizer --tool "$tool" --print-limit 20 --error-exitcode 1 \
    python3 scripts/gpu_smoke.py --small "${skip_paths[@]}"
done

NAT_CUDA_TIMEOUT_S=20 stage bench bench.log python3 benchmarks/assign_bench.py --device cuda --repeats 10 \
  --json "$out/gpu.json" ${skip_re:+--skip "$skip_re"}

timeout_flags=()
python3 -c "import pytest_timeout" 2>/dev/null && timeout_flags=(--timeout 60 -o timeout_method=signal)
NAT_CUDA_TIMEOUT_S=20 STAGE_SIGNAL=INT stage tests tests.log python3 -m pytest -v -rs -p no:cacheprovider \
  -p pytest_hang_guard -m cuda "${timeout_flags[@]}" --durations=15 --junitxml="$out/cuda_tests.xml" tests \
  --ignore-glob='tests/test_nat_*'

ncu_args=(--clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats
          --section WarpStateStats --section SchedulerStats)
if [[ " ${hung[*]} " != *" coop_auction "* ]]; then  # the first launch of each kernel named
  NAT_CUDA_TIMEOUT_S=25 stage ncu tools.log ncu "${ncu_args[@]}" --launch-count 2 \
    --kernel-name 'regex:block_lsap_kernel|auction_repair_kernel' \
    python3 scripts/gpu_smoke.py --profile --case nat_b1 --case auction_4096
else
  echo "stage ncu: skipped (the cooperative auction hung)" | tee -a "$summary"
fi

# The summary: its one timed part (the targets table) under the summary stage's limit.
{
  echo "total: $((SECONDS - start)) s of a ${budget} s budget"
  echo "hangs:"; grep -h '^HANG' "$out"/*.log 2>/dev/null || echo "  none"
  # Each smoke and tool run: its start-up times (the plain runs against those under each
  # compute-sanitizer tool give the tool's start-up), its tally, the tool's error summary.
  echo "smoke and tool runs:"
  grep -h -E '^(=== |startup:|smoke:|========= ERROR SUMMARY)' "$out/smoke.log" "$out/tools.log" 2>/dev/null ||
    echo "  none recorded"
  echo "cooperative auction launches (count, line):"
  grep -h 'nat_ext: cooperative auction' "$out"/*.log 2>/dev/null | sort | uniq -c || echo "  none recorded"
  timeout "${LIMIT[summary]}" python3 scripts/gpu_targets.py --bench "$out/gpu.json" \
    --tests "$out/cuda_tests.xml" --smoke "$out/smoke.log"
} 2>&1 | tee -a "$summary"
