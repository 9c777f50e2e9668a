#!/usr/bin/env bash
# Run here, before a GPU call (again after any change under csrc/ or to setup.py): puts what the
# GPU machine lacks (it reaches no registry) into folders .gitignore names, to name in the
# device call's `carry`:
#   .whl/nat_ext  our extension as a wheel for the machine's CPython 3.12 and torch 2.11.0+cu130,
#                 CUDA ops for sm_90 (scripts/check_torch.sh --wheel), and SOURCE_HASH, the hash
#                 of the sources it was built from: gpu_check.sh uses the wheel only when the
#                 carried sources still have that hash, and builds from source otherwise
#   .whl          the peers lapx and torch-linear-assignment for Python 3.12 (pytest-timeout,
#                 scipy and pytest are on the machine already: KINDS.md's package list)
#   .data         Fashion-MNIST, for train_bench (scripts/gpu_extra.sh)
# and checks that they and the tree fit the 64 MiB a call carries.
#   bash scripts/prepare_gpu_carry.sh      # PYTHON312=... to name another Python 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_lib.sh
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl lapx==0.11.1 torch-linear-assignment==0.1.0

py312=${PYTHON312:-}
for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do
  [ -z "$py312" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null &&
    py312=$candidate
done
[ -n "$py312" ] || { echo "prepare_gpu_carry: no Python 3.12 found; set PYTHON312" >&2; exit 1; }
hash=$(source_hash)
rm -rf "$WHEEL_DIR"
t0=$SECONDS
TORCH_CUDA_ARCH_LIST=9.0 bash scripts/check_torch.sh 2.11.0 1 --python "$py312" --wheel "$WHEEL_DIR"
if [ "$(source_hash)" != "$hash" ]; then
  echo "prepare_gpu_carry: the sources changed during the build; run it again" >&2
  exit 1
fi
echo "$hash" > "$WHEEL_DIR/SOURCE_HASH"
echo "wheel built in $((SECONDS - t0)) s (sources $hash)"

mkdir -p .data/fashion-mnist
cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/
du -sh .whl/*.whl "$WHEEL_DIR"/*.whl .data
# What a call carries: the tracked and untracked-not-ignored files, plus the carried folders.
tree=$(git ls-files -z -co --exclude-standard | du -bc --files0-from=- | tail -1 | cut -f1)
carried=$(du -bsc .whl .data | tail -1 | cut -f1)
total=$((tree + carried))
echo "carry: tree $((tree >> 10)) KiB + .whl and .data $((carried >> 10)) KiB = $((total >> 20)) MiB of 64 MiB"
if ((total > 64 << 20)); then
  echo "prepare_gpu_carry: over the 64 MiB a call carries" >&2
  exit 1
fi
echo 'carry: [".whl"]            command: bash scripts/gpu_check.sh'
echo 'carry: [".whl", ".data"]   command: bash scripts/gpu_extra.sh'
