#!/usr/bin/env bash
# Sets up a fresh machine: system data, Python dependencies, and the extension built in place.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # Fashion-MNIST, the built-in training data (gzip IDX files; no download at run time).
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
python -m pip install -q -r requirements-dev.txt
# --no-build-isolation: build against the torch installed above instead of a fresh copy.
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation -e .
python -c "import nat_ext; print('nat_ext ready, torch', __import__('torch').__version__)"
