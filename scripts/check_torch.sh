#!/usr/bin/env bash
# Builds the extension against another torch, in a venv of its own, and runs the op tests there
# (the training tests need a matching torchvision; the pinned setup runs those). CI runs this for
# the oldest torch we claim and for the GPU machines' torch, so a build that works only with the
# pinned torch cannot land. With --wheel it builds a wheel instead (no tests): what
# scripts/prepare_gpu_carry.sh carries to the GPU machine.
#   bash scripts/check_torch.sh 2.11.0 1     # torch version, FORCE_CUDA (1: the CUDA ops too)
#   bash scripts/check_torch.sh 2.11.0 1 --python ~/.pyenv/versions/3.12.1/bin/python --wheel DIR
set -euo pipefail
version=$1
force_cuda=${2:-0}
shift $(($# < 2 ? $# : 2))
python=python
wheel_dir=
while (($#)); do
  case $1 in
    --python) python=$2; shift 2 ;;
    --wheel) wheel_dir=$(realpath -m "$2"); shift 2 ;;
    *) echo "check_torch.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
root=$PWD
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
venv=$root/build/venv-torch-$version-py$pyver
src=$root/build/src-torch-$version-py$pyver
"$python" -m venv "$venv"
packages=("torch==$version" numpy setuptools wheel ninja)
[ -z "$wheel_dir" ] && packages+=(scipy pytest)
"$venv/bin/python" -m pip install -q "${packages[@]}"
# A copy of the tracked sources, so this build does not replace the in-place one.
rm -rf "$src" && mkdir -p "$src"
# Tracked and untracked-not-ignored files: what a device call carries.
git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$src"
cd "$src"
export FORCE_CUDA=$force_cuda MAX_JOBS="${MAX_JOBS:-2}"
if [ -n "$wheel_dir" ]; then
  # --no-build-isolation: against the venv's torch, not a fresh download of the newest.
  "$venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w "$wheel_dir" .
  # Check the wheel itself: installed alone into an empty folder, imported from there.
  whls=("$wheel_dir"/nat_ext-*.whl)
  whl=${whls[0]}
  rm -rf "$src/wheel-check" && "$venv/bin/python" -m pip install -q --no-deps --target "$src/wheel-check" "$whl"
  (cd / && PYTHONPATH=$src/wheel-check "$venv/bin/python" "$root/scripts/check_build.py" --cuda "$force_cuda")
  echo "wheel: $whl ($(du -h "$whl" | cut -f1))"
  exit 0
fi
"$venv/bin/python" setup.py -q build_ext --inplace
PYTHONPATH=$src "$venv/bin/python" "$root/scripts/check_build.py" --cuda "$force_cuda"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests --ignore-glob='tests/test_nat_*'
