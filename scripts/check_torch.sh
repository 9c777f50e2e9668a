#!/usr/bin/env bash
# Builds the extension against another torch, in a venv of its own, and runs the op tests there
# (the training tests need a matching torchvision; the pinned setup runs those). CI runs this for
# the oldest torch we claim and for the GPU machines' torch, so a build that works only with the
# pinned torch cannot land.
#   bash scripts/check_torch.sh 2.11.0 1     # torch version, FORCE_CUDA (1: the CUDA ops too)
set -euo pipefail
version=$1
force_cuda=${2:-0}
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/build/venv-torch-$version
src=$root/build/src-torch-$version
python -m venv "$venv"
"$venv/bin/python" -m pip install -q "torch==$version" numpy scipy pytest setuptools wheel ninja
# A copy of the tracked sources, so this build does not replace the in-place one.
rm -rf "$src" && mkdir -p "$src"
git ls-files -z | xargs -0 cp --parents -t "$src"
cd "$src"
FORCE_CUDA=$force_cuda MAX_JOBS="${MAX_JOBS:-2}" "$venv/bin/python" setup.py -q build_ext --inplace
"$venv/bin/python" - <<PY
import torch, nat_ext
cuda = torch._C._dispatch_has_kernel_for_dispatch_key("nat::linear_sum_assignment", "CUDA")
assert cuda == ("$force_cuda" == "1"), f"CUDA kernels registered: {cuda}, FORCE_CUDA=$force_cuda"
print(f"nat_ext built against torch {torch.__version__} (CUDA kernels: {cuda})")
PY
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests --ignore-glob='tests/test_nat_*'
