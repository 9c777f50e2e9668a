# shellcheck shell=bash
# What scripts/gpu_check.sh and scripts/gpu_extra.sh share, sourced by both (and source_hash by
# scripts/prepare_gpu_carry.sh): the budget table and its check, the timed stage runner, the
# install of the carried wheel with its fallback build, and the hang pattern. The budget's model
# and each stage's deadline are scripts/gpu_plan.py's.

# An error matching this is a hung kernel: the plain ops' deadline (NAT_CUDA_TIMEOUT_S) or
# pytest-timeout's. gpu_smoke.py, assign_bench.py and pytest_hang_guard.py read it from here.
export NAT_HANG_RE='did not finish within NAT_CUDA_TIMEOUT_S|Timeout \(?>'
# The extension wheel prepare_gpu_carry.sh builds, and the hash of the sources it was built from.
WHEEL_DIR=.whl/nat_ext
# The sources the compiled module is made from (what a wheel must match to be used).
source_hash() {
  find csrc setup.py -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.py' \) \
    -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}

# budget_begin OUTDIR BUDGET NAME LIMIT [NOTE] ...: the stage table, one "NAME LIMIT NOTE" a line
# on stdin when no pairs are given (scripts/gpu_plan.py plan's output). Prints it with its sum and
# refuses to start (exit 2) when the limits add up to more than the budget. The same code prints
# a real run's table and a dry run's.
budget_begin() {
  out=$1 budget=$2
  shift 2
  mkdir -p "$out"
  summary=$out/summary.txt
  : > "$summary"
  [ -n "${DRY:-}" ] && echo "dry run: stand-ins, no GPU (the limits are a real run's; the times are not a GPU's)" | tee -a "$summary"
  declare -gA LIMIT=()
  PLAN_ORDER=()
  local sum=0 table="" name lim note
  if (($#)); then
    while (($#)); do printf '%s %s\n' "$1" "$2"; shift 2; done
  else
    cat
  fi > "$out/.plan"
  while read -r name lim note; do
    LIMIT[$name]=$lim
    PLAN_ORDER+=("$name")
    sum=$((sum + lim))
    table+=$(printf '  %-22s %4d s  %s' "$name" "$lim" "$note")$'\n'
  done < "$out/.plan"
  rm -f "$out/.plan"
  {
    echo "budget: stage limits (a stage is also cut to the time left; want: scripts/gpu_plan.py's model)"
    printf '%s' "$table"
    printf '  %-22s %4d s of a %d s budget\n' "sum" "$sum" "$budget"
  } | tee -a "$summary"
  if ((sum > budget || sum == 0)); then
    echo "budget: the stage limits sum to ${sum} s, over the ${budget} s budget (or no table)" | tee -a "$summary"
    exit 2
  fi
  start=$SECONDS
  skip_reason=
  hung=()
  nvidia-smi -L > /dev/null 2>&1 || skip_reason="no GPU: nvidia-smi -L fails"
  [ -n "$skip_reason" ] && echo "budget: $skip_reason; only env and the summary run" | tee -a "$summary"
  # (install_ext sets skip_reason too, when neither the wheel nor a build gives a working module)
  return 0
}

# wanted NAME: whether the caller's stage list (ONLY, from the command line) names NAME or a
# prefix of it (smoke-coop names smoke-coop-auction); an empty list runs every stage.
wanted() {
  [ -z "${ONLY:-}" ] && return 0
  local word
  for word in $ONLY; do [[ "$1" == "$word"* ]] && return 0; done
  return 1
}

# stage_limit NAME: the stage's limit cut to the time left (0 when the budget is spent).
stage_limit() {
  local limit=${LIMIT[$1]:-0} left=$((budget - (SECONDS - start)))
  ((left < (limit < 15 ? limit : 15))) && limit=0
  ((limit > left)) && limit=$left
  echo "$limit"
}

# stage NAME LOG CMD...: runs CMD under its limit (stage_limit), appends its output to $out/LOG
# and a line to the summary: `stage NAME: rc=RC in T s (limit L s, deadline D s[, TIMED OUT|HANG])`;
# sets stage_rc. The limit includes a grace after the signal (5 s, 1 s for limits under 15 s; the
# signal is STAGE_SIGNAL, TERM unless set: INT lets pytest write its report), so a stage never
# takes longer than its limit. The command gets NAT_STAGE (the name), NAT_STAGE_LIMIT (the limit,
# for gpu_smoke.py and the tests plugin to fit their selection), NAT_STAGE_T0 (the epoch second
# it began) and NAT_CUDA_TIMEOUT_S (scripts/gpu_plan.py's deadline for that limit, so a hung
# kernel raises before the stage is cut). A command that is not on the PATH fails at once (rc
# 127). A stage that hangs or is cut while a gpu_smoke.py case runs adds that case's path to
# `hung`, which the later stages leave out.
stage() {
  local name=$1 log=$2
  shift 2
  stage_rc=
  wanted "$name" || return 0
  if [ -n "${skip_reason:-}" ] && [ "$name" != env ]; then
    echo "stage $name: skipped ($skip_reason)" | tee -a "$summary"
    stage_rc=skipped
    return 0
  fi
  local limit
  limit=$(stage_limit "$name")
  if ! command -v "$1" > /dev/null || [[ -n "${DRY:-}" && " ${NAT_DRY_MISSING:-} " == *" $1 "* ]]; then
    echo "stage $name: rc=127 in 0 s (limit $limit s; $1 not found)" | tee -a "$summary"
    stage_rc=127
    return 0
  fi
  if ((limit == 0)); then
    echo "stage $name: skipped (budget spent: limit ${LIMIT[$name]:-0} s, $((budget - (SECONDS - start))) s left)" |
      tee -a "$summary"
    stage_rc=skipped
    return 0
  fi
  local grace=$((limit >= 15 ? 5 : 1)) deadline  # (timeout 0 would mean no limit at all)
  deadline=$(python3 scripts/gpu_plan.py deadline "$name" "$limit") || return 2
  echo "=== $name (limit ${limit} s, deadline ${deadline} s) $(date -u +%T)" >> "$out/$log"
  local t0=$SECONDS
  NAT_STAGE=$name NAT_STAGE_LIMIT=$limit NAT_CUDA_TIMEOUT_S=$deadline NAT_STAGE_T0=$(date +%s.%N) \
    timeout -s "${STAGE_SIGNAL:-TERM}" -k "$grace" $((limit - grace)) "$@" >> "$out/$log" 2>&1
  stage_rc=$?
  local note="" path=""
  ((stage_rc == 124 || stage_rc == 137)) && note=", TIMED OUT"
  ((stage_rc == 3)) && note=", HANG"
  if [ -n "$note" ]; then  # the case that was running: the last START line of this stage's part
    path=$(sed -n "/^=== $name /,\$p" "$out/$log" | grep '^START ' | tail -1 | sed -n 's/.*(path \([a-z_]*\)).*/\1/p')
    if [ -n "$path" ]; then
      note+="; path $path left out of the later stages"
      [[ " ${hung[*]} " == *" $path "* ]] || hung+=("$path")
    fi
  fi
  echo "stage $name: rc=$stage_rc in $((SECONDS - t0)) s (limit $limit s, deadline $deadline s$note)" | tee -a "$summary"
}

# install_ext: puts a compiled nat_ext._C beside the sources, so every stage imports the tree's
# Python code. From the carried wheel when it was built from these sources (wheel_state says
# "current"); else, or when the wheel's module does not import or has no CUDA kernels (exit 2 of
# scripts/check_build.py: what a rebuild can fix), built from source under LIMIT[build]. A wrong,
# uncertified or hung 3x3 is a finding (summary: WRONG ANSWER / HANG), not a broken wheel: the
# later stages run with that module and diagnose it. A dry run checks the in-tree module that
# scripts/setup.sh built, its 3x3 on the CPU, and never builds.
install_ext() {
  [ -n "${skip_reason:-}" ] && { echo "stage install: skipped ($skip_reason)" | tee -a "$summary"; return 0; }
  local state whl
  state=$(wheel_state)
  whl=$(compgen -G "$WHEEL_DIR/nat_ext-*.whl" | head -1)
  if [ -n "${DRY:-}" ]; then
    echo "install: wheel $state; the dry run checks the in-tree module instead (no build)" | tee -a "$summary"
    stage install install.log python3 scripts/check_build.py --cuda 1 --run --device cpu
    [ -n "${LIMIT[build]:-}" ] &&
      echo "stage build: not run (dry run; a real run builds from source here, limit ${LIMIT[build]} s)" | tee -a "$summary"
    return 0
  fi
  if [ "$state" = current ]; then
    stage install install.log python3 scripts/check_build.py --unpack "$whl" --cuda 1 --run
    [ "$stage_rc" = 2 ] || return 0
    echo "install: the wheel's module does not import or has no CUDA kernels (see install.log); building from source" |
      tee -a "$summary"
    rm -f nat_ext/_C*.so
    # Not planned: the stages after it are planned again on the time left.
    replan "build $(planned_after install)"
  else
    echo "install: wheel $state; building from source (the build line of the budget)" | tee -a "$summary"
  fi
  # (gpu_extra.sh's table has no build line: the model's, the later stages cut to the time left)
  [ -n "${LIMIT[build]:-}" ] || LIMIT[build]=$(python3 scripts/gpu_plan.py plan --stages build | cut -d' ' -f2)
  stage build install.log bash -c "FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace && python3 scripts/check_build.py --cuda 1 --run"
  # Only a module that does not import (or has no CUDA kernels) stops the later stages.
  [ "$stage_rc" = 0 ] || [ "$stage_rc" = 1 ] || [ "$stage_rc" = 3 ] ||
    skip_reason="no working extension: see install.log"
  return 0
}

# wheel_state: "current" (a wheel built from these sources), "stale (...)" or "missing (...)".
wheel_state() {
  local whl recorded
  whl=$(compgen -G "$WHEEL_DIR/nat_ext-*.whl" | head -1)
  recorded=$(cat "$WHEEL_DIR/SOURCE_HASH" 2>/dev/null)
  if [ -z "$whl" ]; then
    echo "missing (no $WHEEL_DIR/nat_ext-*.whl: run scripts/prepare_gpu_carry.sh and carry .whl)"
  elif [ "$recorded" != "$(source_hash)" ]; then
    echo "stale ($whl was built from sources ${recorded:-unrecorded}, these are $(source_hash): rerun scripts/prepare_gpu_carry.sh)"
  else
    echo current
  fi
}

# planned_after NAME: the planned stages after NAME, in order.
planned_after() {
  local s seen="" after=()
  for s in "${PLAN_ORDER[@]}"; do
    [ -n "$seen" ] && after+=("$s")
    [ "$s" = "$1" ] && seen=1
  done
  echo "${after[*]}"
}

# replan STAGES: plans STAGES again on the time left (the table printed again).
replan() {
  local left=$((budget - (SECONDS - start))) plan name lim note
  plan=$(python3 scripts/gpu_plan.py plan --budget "$left" --stages "$1") || return 0
  echo "budget: planned again on the ${left} s left" | tee -a "$summary"
  while read -r name lim note; do
    LIMIT[$name]=$lim
    printf '  %-22s %4d s  %s\n' "$name" "$lim" "$note" | tee -a "$summary"
  done <<< "$plan"
}

# The peers' wheels (lapx, torch-linear-assignment) where the machine lacks them (the stage
# "peers"), the tree and scripts/ on the path, and the data.
carried_env() {
  if compgen -G ".whl/*.whl" > /dev/null; then
    stage peers install.log python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl
    [ "$stage_rc" = 0 ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$PWD:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}
  [ -d .data/fashion-mnist ] && export NAT_FASHION_MNIST_DIR=$PWD/.data/fashion-mnist
  return 0
}

# out_files: clears a gpu.json.tmp that a bench cut mid-write left, and lists what $out holds
# (a device call brings back 8 files).
out_files() {
  if [ -e "$out/gpu.json.tmp" ]; then
    rm -f "$out/gpu.json.tmp"
    echo "files: removed gpu.json.tmp (a write cut by the bench's limit; gpu.json keeps its last complete rows)"
  fi
  echo "files: $(find "$out" -maxdepth 1 -type f | wc -l) in $out (8 come back): $(cd "$out" && echo *)"
}

# dry_standins DIR: the dry run's stand-ins, put first on the PATH: an nvidia-smi that answers
# for no GPU, and a compute-sanitizer that skips its options and runs the command.
dry_standins() {
  printf '%s\n' '#!/usr/bin/env bash' "# gpu_check.sh --dry-run's stand-in" \
    'if [ "${1:-}" = -L ]; then echo "GPU 0: dry-run stand-in (no GPU)"; else printf "name\nstand-in\n"; fi' \
    > "$1/nvidia-smi"
  printf '%s\n' '#!/usr/bin/env bash' "# gpu_check.sh --dry-run's stand-in: runs the command, no tool" \
    'while [ $# -gt 0 ] && [[ $1 == --* ]]; do' \
    '  case $1 in --tool|--print-limit|--error-exitcode) shift 2 ;; *) shift ;; esac' \
    'done' \
    'echo "========= COMPUTE-SANITIZER (dry-run stand-in: runs the command, checks nothing)"' \
    '"$@"; rc=$?' \
    'echo "========= ERROR SUMMARY: 0 errors (stand-in)"' \
    'exit $rc' > "$1/compute-sanitizer"
  chmod +x "$1/nvidia-smi" "$1/compute-sanitizer"
}

# dry_expectations SUMMARY: what a dry run must show; prints each one missing, fails if any is.
dry_expectations() {
  local e bad=0
  local expect=(
    '^stage env: rc=0 ' '^stage install: rc=0 '
    '^stage smoke-jv: rc=1 ' '^WRONG ANSWER \[smoke-jv\] jv_one_warp'
    '^stage smoke-block-auction: rc=3 .*HANG; path block_auction left out' '^HANG auction_small'
    '^stage smoke-coop-auction: rc=0 '
    '^stage synccheck: rc=1 ' '^stage racecheck: rc=1 ' '^stage memcheck: rc=1 '
    '^stage bench: rc=0 ' '^stage tests: rc=0 ' '^select: .* of .* tests' '^stage ncu: rc=127 in 0 s'
    '^files: removed gpu.json.tmp' '^files: 8 in '
    '^rerun \(.*exit 0$' '^rerun: stage smoke-coop-auction: rc=0 ' '^rerun: stage memcheck: rc=127 in 0 s')
  head -1 "$1" | grep -q '^dry run: stand-ins, no GPU' || { echo "dry run: the first line does not say so"; bad=1; }
  for e in "${expect[@]}"; do
    grep -qE "$e" "$1" || { echo "dry run: no line matching /$e/"; bad=1; }
  done
  grep -q '^stage .*TIMED OUT' "$1" && { echo "dry run: a stand-in ran into its limit"; bad=1; }
  grep -q '^START auction_small' "$out/tools.log" && { echo "dry run: the hung path ran under a tool"; bad=1; }
  ((bad)) && { echo "dry run: FAILED (a harness error)" | tee -a "$1"; return 1; }
  echo "dry run: every expectation met" | tee -a "$1"
}
