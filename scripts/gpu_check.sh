#!/usr/bin/env bash
# GPU check: the CUDA tests and a bf16-mixed fit with the callbacks, when CUDA is present.
# Usage: bash scripts/gpu_check.sh   (or: make gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA: nothing to check on this machine"
  exit 0
fi
"$PY" -c "import torch; print('CUDA', torch.version.cuda, torch.cuda.get_device_name(0), 'torch', torch.__version__)"
"$PY" -m pytest -q -m cuda tests
"$PY" scripts/gpu_check.py
