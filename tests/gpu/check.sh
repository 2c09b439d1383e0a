#!/usr/bin/env bash
# GPU check of the reference payloads (tests/gpu/check.py), in one short run on a machine
# with a GPU and a CUDA PyTorch (its python3). aifactory need not be installed there: the
# payloads' folder is made importable under its package name through a tree of links.
#   tests/gpu/check.sh [--small]     figures in ${OUT:-.}/gpu-figures.json
set -euo pipefail
cd "$(dirname "$0")/../.."
tree=$(mktemp -d)
mkdir -p "$tree/aifactory"
ln -s "$PWD/tasks" "$tree/aifactory/tasks"
export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" tests/gpu/check.py --out "${OUT:-.}/gpu-figures.json" "$@"
rm -rf "$tree"
