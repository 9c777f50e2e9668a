#!/usr/bin/env bash
# Everything a GPU machine should run, in one go (a lent GPU's time is short): build the CUDA
# ops against the torch already installed there, run the tests (the CUDA ones run instead of
# skipping), then the GPU benchmark. Logs and the benchmark JSON go to $OUT (or ./gpu_out).
# Peers missing there (lapx, torch-linear-assignment) can be carried as wheels in .whl/.
#   bash scripts/gpu_check.sh
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tee "$out/build.log" | tail -5
python3 -c "import torch, nat_ext; assert torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name())" || exit 1
python3 -m pytest -q -rs tests/test_cuda_core.py tests/test_lsap.py tests/test_assign.py 2>&1 |
  tee "$out/tests.log" | tail -25
python3 benchmarks/assign_bench.py --device cuda --json "$out/gpu.json" 2>&1 | tee "$out/bench.log"
