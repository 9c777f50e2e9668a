#!/usr/bin/env bash
# Run here, before a GPU call: puts what the GPU machine lacks (it reaches no registry) into
# ignored folders of the repo, to name in the device call's `carry`: .whl (the peers lapx and
# torch-linear-assignment for Python 3.12) and .data (Fashion-MNIST, for train_bench).
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.data/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl lapx==0.11.1 torch-linear-assignment==0.1.0
mkdir -p .data/fashion-mnist
cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/
du -sh .whl .data
echo 'carry: [".whl", ".data"]   command: bash scripts/gpu_check.sh'
