# shellcheck shell=bash
# What scripts/gpu_check.sh and scripts/gpu_extra.sh share, sourced by both (and source_hash by
# scripts/prepare_gpu_carry.sh): the budget table and its check, the timed stage runner, the
# install of the carried wheel with its fallback build, and the hang pattern.

# An error matching this is a hung kernel: the plain ops' deadline (NAT_CUDA_TIMEOUT_S) or
# pytest-timeout's. gpu_smoke.py, assign_bench.py and pytest_hang_guard.py read it from here.
export NAT_HANG_RE='did not finish within NAT_CUDA_TIMEOUT_S|Timeout \(?>'
# The extension wheel prepare_gpu_carry.sh builds, and the hash of the sources it was built from.
WHEEL_DIR=.whl/nat_ext
# A build from source when the wheel fails: not in the budget table; later stages are then cut
# to the time left (the last ones first).
LIMIT_FALLBACK_BUILD=150

# The sources the compiled module is made from (what a wheel must match to be used).
source_hash() {
  find csrc setup.py -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.py' \) \
    -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}

# budget_begin OUTDIR BUDGET NAME LIMIT NAME LIMIT ...: the stage table. Prints it with its sum
# and refuses to start (exit 2) when the limits add up to more than the budget.
budget_begin() {
  out=$1 budget=$2
  shift 2
  mkdir -p "$out"
  summary=$out/summary.txt
  : > "$summary"
  declare -gA LIMIT=()
  local sum=0 table=""
  while (($#)); do
    LIMIT[$1]=$2
    sum=$((sum + $2))
    table+=$(printf '  %-22s %4d s' "$1" "$2")$'\n'
    shift 2
  done
  {
    echo "budget: stage limits (a stage is also cut to the time left)"
    printf '%s' "$table"
    printf '  %-22s %4d s of a %d s budget\n' "sum" "$sum" "$budget"
  } | tee -a "$summary"
  if ((sum > budget)); then
    echo "budget: the stage limits sum to ${sum} s, over the ${budget} s budget" | tee -a "$summary"
    exit 2
  fi
  start=$SECONDS
  skip_reason=
  nvidia-smi -L > /dev/null 2>&1 || skip_reason="no GPU: nvidia-smi -L fails"
  [ -n "$skip_reason" ] && echo "budget: $skip_reason; only env and the summary run" | tee -a "$summary"
  # (install_ext sets skip_reason too, when neither the wheel nor a build gives a working module)
  return 0
}

# wanted NAME: whether the caller's stage list (ONLY, from the command line) names NAME; an
# empty list runs every stage.
wanted() {
  [ -z "${ONLY:-}" ] && return 0
  [[ " $ONLY " == *" $1 "* ]]
}

# stage NAME LOG CMD...: runs CMD under its limit (LIMIT[NAME], at most the time left), appends
# its output to $out/LOG and a line to the summary; sets stage_rc. The limit includes a grace
# after the signal (5 s, 1 s for limits under 15 s; the signal is STAGE_SIGNAL, TERM unless set:
# INT lets pytest write its report), so a stage never takes longer than its limit. NAT_STAGE_T0 tells the command when the stage began.
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
  local limit=${LIMIT[$name]} left=$((budget - (SECONDS - start)))
  if ((left < (limit < 15 ? limit : 15))); then
    echo "stage $name: skipped (budget spent)" | tee -a "$summary"
    stage_rc=skipped
    return 0
  fi
  ((limit > left)) && limit=$left
  local grace=$((limit >= 15 ? 5 : 1))  # (timeout 0 would mean no limit at all)
  echo "=== $name (limit ${limit} s) $(date -u +%T)" >> "$out/$log"
  local t0=$SECONDS
  NAT_STAGE_T0=$(date +%s.%N) timeout -s "${STAGE_SIGNAL:-TERM}" -k "$grace" $((limit - grace)) "$@" >> "$out/$log" 2>&1
  stage_rc=$?
  local note=""
  ((stage_rc == 124 || stage_rc == 137)) && note=" (TIMED OUT)"
  ((stage_rc == 3)) && note=" (HANG)"
  echo "stage $name: rc=$stage_rc in $((SECONDS - t0)) s$note" | tee -a "$summary"
}

# install_ext: puts a compiled nat_ext._C beside the sources, so every stage imports the tree's
# Python code: from the carried wheel when it was built from these sources and passes
# check_build.py (CUDA kernels registered, a 3x3 solved on the GPU); else built from source.
install_ext() {
  [ -n "${skip_reason:-}" ] && { echo "stage install: skipped ($skip_reason)" | tee -a "$summary"; return 0; }
  local whl=
  compgen -G "$WHEEL_DIR/nat_ext-*.whl" > /dev/null && whl=$(compgen -G "$WHEEL_DIR/nat_ext-*.whl" | head -1)
  if [ -n "$whl" ] && [ "$(cat "$WHEEL_DIR/SOURCE_HASH" 2>/dev/null)" != "$(source_hash)" ]; then
    echo "install: $whl was built from other sources (hash $(cat "$WHEEL_DIR/SOURCE_HASH" 2>/dev/null)," \
      "these are $(source_hash)): rerun scripts/prepare_gpu_carry.sh; building from source" | tee -a "$summary"
    whl=stale
  fi
  if [ -n "$whl" ] && [ "$whl" != stale ]; then
    stage install install.log python3 scripts/check_build.py --unpack "$whl" --cuda 1 --run
    [ "$stage_rc" = 0 ] && return 0
    echo "install: the wheel failed (see install.log); building from source" | tee -a "$summary"
    rm -f nat_ext/_C*.so
  elif [ -z "$whl" ]; then
    echo "install: no wheel in $WHEEL_DIR; building from source" | tee -a "$summary"
  fi
  LIMIT[build]=$LIMIT_FALLBACK_BUILD
  stage build install.log bash -c "FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace && python3 scripts/check_build.py --cuda 1 --run"
  # Without a working extension every later stage would only fail on its import.
  [ "$stage_rc" = 0 ] || skip_reason="no working extension: see install.log"
  return 0
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
