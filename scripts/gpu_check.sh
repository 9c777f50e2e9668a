#!/usr/bin/env bash
# The GPU check in one command, sized for a lent GPU's 15 minutes of device time: a machine start
# (1-2 min), this script (GPU_CHECK_BUDGET, 500 s), and a rerun with a new start still fit.
# Prepare it here first with scripts/prepare_gpu_carry.sh, and carry .whl:
#   bash scripts/gpu_check.sh                 # every stage
#   bash scripts/gpu_check.sh smoke-coop      # a rerun: env and install, then the named stages (a
#                                             # name may be a stage's prefix)
#   bash scripts/gpu_check.sh --dry-run       # here, no GPU: every stage in order against stand-ins
# The stage table comes from scripts/gpu_plan.py's model: each stage's limit is what its selection
# needs (cases, cold starts, a sanitizer's slow-down), given in the order of value (smoke and the
# sanitizers, the benchmark, the tests, ncu) and cut to the time left; a stage given less selects
# less. Without a current wheel the build from source has its own line and the rest is planned
# around it. A failed stage does not stop the later ones. Stages, in order:
#   env, install   the GPU, driver, nvcc; the carried wheel's compiled module, checked (CUDA
#                  kernels registered, a 3x3 solved on the GPU). Only a module that does not
#                  import or has no CUDA kernels is rebuilt; a wrong or hung 3x3 is the first
#                  finding and the later stages run with that module
#   smoke-*        scripts/gpu_smoke.py, one process a solver path (jv, block auction,
#                  cooperative auction), each checked bit for bit against the host team run
#   synccheck, racecheck, memcheck
#                  compute-sanitizer on the small cases (gpu_smoke.py --small: torch and nat_ext
#                  only), caching allocator off; each run prints its start-up times
#   bench          benchmarks/assign_bench.py: GPU solvers first, CPU peers timed once, JSON
#                  written after each solver; the least valuable rows left out when cut
#   tests          the CUDA op tests (-m cuda, not tests/test_nat_*), fitted to the limit by
#                  scripts/pytest_hang_guard.py (the smallest case of each test first), stopped at
#                  the first hang, and at the stage limit by SIGINT, so pytest writes its JUnit XML
#   ncu            Nsight Compute on the B=1 NAT step's jv kernel and the 4096 auction's repair
#   summary        the stage lines, the hangs, the wrong answers, start-up times, the cooperative
#                  launch's blocks per SM, sanitizer error counts, the PASS/MISS table of targets
# Every stage runs with NAT_CUDA_FALLBACK=raise, so a GPU failure raises rather than being
# re-solved on the CPU, and NAT_CUDA_TIMEOUT_S under the stage's limit (gpu_plan.py deadline), so a
# hung kernel raises (a HANG line) before the stage is cut. A path that hangs or is cut under any
# stage is left out of the later ones. Exit 0 when the harness ran, whatever it found; 2 for a
# harness error (a budget over its sum; a dry run whose expectations fail).
# Writes 8 flat files to $OUT (or ./gpu_out): summary.txt install.log smoke.log tools.log
# bench.log gpu.json tests.log cuda_tests.xml. The threads sweep, train_bench and the training
# code's CUDA tests are in scripts/gpu_extra.sh.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
DRY=
[ "${1:-}" = --dry-run ] && { DRY=1; shift; }
source scripts/gpu_lib.sh
export PYTHONUNBUFFERED=1 NAT_CUDA_FALLBACK=raise
ONLY=${*:+env peers install build $* summary}

if [ -n "$DRY" ]; then  # the stand-ins: a fake nvidia-smi, a sanitizer that runs the command
  fakebin=$(mktemp -d)
  trap 'rm -rf "$fakebin"' EXIT
  dry_standins "$fakebin"
  export PATH=$fakebin:$PATH
  # Tools the dry run treats as missing (stage() fails them at once): ncu, and in the rerun
  # compute-sanitizer too.
  export NAT_DRY_MISSING=${NAT_DRY_MISSING:-ncu}
  # One hang (the deadline firing in the block auction's first case) and one wrong answer (a
  # swapped pair in the jv path's first case): gpu_smoke.py injects them on the CPU only.
  [ -z "$ONLY" ] && export NAT_SMOKE_INJECT="hang=auction_small wrong=jv_one_warp"
fi
out=${OUT:-gpu_out${DRY:+_dry}}
budget=${GPU_CHECK_BUDGET:-$(python3 scripts/gpu_plan.py budget)}

# The table: every stage this run has (peers only with carried peers' wheels, the build only
# without a current wheel; a rerun only the named ones), planned by scripts/gpu_plan.py.
stages=env
compgen -G ".whl/*.whl" > /dev/null && stages+=" peers"
stages+=" install"
# The build line without a current wheel; a dry run's in-tree module stands in for a current
# wheel, so its table is a real run's with one (its rerun pass shows the build line).
if [ "$(wheel_state)" != current ] && { [ -z "$DRY" ] || [ -n "$ONLY" ]; }; then
  stages+=" build"
fi
for s in smoke-jv smoke-block-auction smoke-coop-auction synccheck racecheck memcheck bench tests ncu summary; do
  wanted "$s" && stages+=" $s"
done
budget_begin "$out" "$budget" < <(python3 scripts/gpu_plan.py plan --budget "$budget" --stages "$stages")
stage env install.log bash -c 'date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv; nvcc --version | tail -2; python3 --version'
carried_env
install_ext

# One process a solver path: torch starts three times, and a hang costs only its path (stage()
# adds it to `hung`). No CUDA_LAUNCH_BLOCKING: a synchronous launch would block before the
# deadline's wait. The cooperative launch prints its blocks per SM (NAT_CUDA_VERBOSE).
device=(); [ -n "$DRY" ] && device=(--device cpu)  # the CPU twin: the team run at 4 threads vs 1
for path in jv block_auction coop_auction; do
  NAT_CUDA_VERBOSE=1 stage "smoke-${path//_/-}" smoke.log python3 scripts/gpu_smoke.py "${device[@]}" --path "$path"
done

# No caching allocator under the sanitizer: else an overrun lands in a larger cached block and
# goes unseen. (racecheck sees shared memory only.) A path that hung or was cut under an earlier
# tool is left out of the later ones.
for tool in synccheck racecheck memcheck; do
  skip_paths=()
  for path in "${hung[@]}"; do skip_paths+=(--skip-path "$path"); done
  NAT_CUDA_VERBOSE=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    stage "$tool" tools.log compute-sanitizer --tool "$tool" --print-limit 20 --error-exitcode 1 \
    python3 scripts/gpu_smoke.py "${device[@]}" --small "${skip_paths[@]}"
done

# The benchmark without the hung paths' rows and, when cut, the least valuable rows.
bench_args=(--device cuda --repeats 10)
[ -n "$DRY" ] && bench_args=(--device cpu --max-n 64 --repeats 2)  # a reduced CPU case set
skip_re=$(python3 scripts/gpu_plan.py bench-skip "$(stage_limit bench)" "${hung[@]}")
stage bench bench.log python3 benchmarks/assign_bench.py "${bench_args[@]}" --json "$out/gpu.json" \
  ${skip_re:+--skip "$skip_re"}

# The tests, fitted to the stage's limit by the plugin; pytest-timeout's per-test limit under
# the stage's (the cold torch.compile is the longest test).
tests_sel=(-m cuda tests --ignore-glob='tests/test_nat_*')
if [ -n "$DRY" ]; then  # a reduced CPU set, the allowance cut so that the selection must choose
  tests_sel=(-m 'not cuda' tests/test_cuda_core.py -k 'algorithm_matches_scipy or batched')
  export NAT_TESTS_ALLOWANCE_S=3
fi
# What the stages so far left unused goes to the tests and ncu: both planned again on the time left.
rest=$(planned_after bench)
[ -n "$rest" ] && [ -z "${skip_reason:-}" ] && replan "$rest"
tl=$(stage_limit tests)
timeout_flags=()
python3 -c "import pytest_timeout" 2>/dev/null &&
  timeout_flags=(--timeout $((tl > 40 ? tl - 20 : 20)) -o timeout_method=signal)
STAGE_SIGNAL=INT stage tests tests.log python3 -m pytest -v -rfs -p no:cacheprovider -p pytest_hang_guard \
  "${timeout_flags[@]}" --durations=15 --junitxml="$out/cuda_tests.xml" "${tests_sel[@]}"

# The first launch of each kernel named, of the paths that did not hang.
ncu_args=(--clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats
          --section WarpStateStats --section SchedulerStats)
ncu_cases=()
[[ " ${hung[*]} " == *" jv "* ]] || ncu_cases+=(--case nat_b1)
[[ " ${hung[*]} " == *" coop_auction "* ]] || ncu_cases+=(--case auction_4096)
if ((${#ncu_cases[@]})); then
  stage ncu tools.log ncu "${ncu_args[@]}" --launch-count 2 \
    --kernel-name 'regex:block_lsap_kernel|auction_repair_kernel' \
    python3 scripts/gpu_smoke.py "${device[@]}" --profile "${ncu_cases[@]}"
elif wanted ncu; then
  echo "stage ncu: skipped (its paths hung: ${hung[*]})" | tee -a "$summary"
fi

# A bench cut in the middle of a write leaves gpu.json.tmp beside the last complete gpu.json:
# a ninth file, and only 8 come back. (The dry run leaves one to show it is cleared.)
[ -n "$DRY" ] && [ -z "$ONLY" ] && echo '{"rows": [' > "$out/gpu.json.tmp"

# The summary: its one timed part (the targets table) under the summary stage's limit.
{
  echo "total: $((SECONDS - start)) s of a ${budget} s budget"
  echo "hangs (a deadline's HANG line; a stage cut at its limit says TIMED OUT above):"
  grep -h '^HANG' "$out"/*.log 2>/dev/null || echo "  none"
  echo "wrong answers:"
  grep -h '^WRONG ANSWER' "$out"/*.log 2>/dev/null || echo "  none"
  # Each smoke and tool run: its start-up times (the plain runs against those under each
  # compute-sanitizer tool give the tool's start-up), its tally, the tool's error summary.
  echo "smoke and tool runs:"
  grep -h -E '^(=== |startup:|select:|smoke:|========= ERROR SUMMARY)' "$out/smoke.log" "$out/tools.log" 2>/dev/null ||
    echo "  none recorded"
  grep -h '^select:' "$out/tests.log" 2>/dev/null
  echo "cooperative auction launches (count, line):"
  grep -h 'nat_ext: cooperative auction' "$out"/*.log 2>/dev/null | sort | uniq -c || echo "  none recorded"
  timeout "${LIMIT[summary]:-5}" python3 scripts/gpu_targets.py --bench "$out/gpu.json" \
    --tests "$out/cuda_tests.xml" --smoke "$out/smoke.log"
  out_files
} 2>&1 | tee -a "$summary"

# The dry run also checks the rerun mode, with compute-sanitizer missing, and then its own
# expectations; a failed expectation is a harness error.
if [ -n "$DRY" ] && [ -z "$ONLY" ]; then
  rerun_out=$(mktemp -d)
  env -u NAT_SMOKE_INJECT OUT="$rerun_out" NAT_DRY_MISSING="ncu compute-sanitizer" \
    bash scripts/gpu_check.sh --dry-run smoke-coop memcheck > "$rerun_out/stdout" 2>&1
  echo "rerun (gpu_check.sh --dry-run smoke-coop memcheck, compute-sanitizer missing): exit $?" | tee -a "$summary"
  grep -E '^(stage |budget: |  [a-z-]+ +[0-9]+ s)' "$rerun_out/summary.txt" | sed 's/^/rerun: /' | tee -a "$summary"
  rm -rf "$rerun_out"
  dry_expectations "$summary" || exit 2
fi
exit 0
