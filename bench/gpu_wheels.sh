#!/usr/bin/env bash
# Download, here (with package-registry access), the pure-Python wheels that bench/gpu_check.sh needs beside a GPU
# machine's own torch, numpy and scipy, into DIR (default .whl, which git ignores):
#   bash bench/gpu_wheels.sh [DIR]
# and there: python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl; export PYTHONPATH=/tmp/site
set -eu
cd "$(dirname "$0")/.."
dir=${1:-.whl}
pins=$(grep -E '^(monai|nibabel|pytorch-ignite)==' requirements.txt)
python3 -m pip download --no-deps --only-binary=:all: -d "$dir" $pins
ls -l "$dir"
