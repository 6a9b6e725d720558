#!/usr/bin/env bash
# GPU check: the CUDA tests, then each section of scripts/gpu_check.py with 1 and 2 processes.
# Usage: bash scripts/gpu_check.sh   (or: make gpu-check)
# Exits non-zero when any check failed; prints a summary either way. Sections that need 2 GPUs
# are reported as SKIPPED (not passed) on a 1-GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA: nothing to check on this machine"
  exit 0
fi
"$PY" -c "import torch; print('CUDA', torch.version.cuda, torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), 'torch', torch.__version__)"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
LOG=${GPU_CHECK_LOG:-$(mktemp -d)}
mkdir -p "$LOG"
declare -a SUMMARY=()
FAILED=0

run() {  # run NAME COMMAND...
  local name=$1
  shift
  echo "=== $name: $*"
  if "$@" >"$LOG/$name.log" 2>&1; then
    SUMMARY+=("PASS  $name  $(grep -h '^PASSED' "$LOG/$name.log" | tail -1)")
  else
    FAILED=1
    SUMMARY+=("FAIL  $name  $(grep -h -E '^FAILED|Error' "$LOG/$name.log" | tail -1)")
    tail -n 40 "$LOG/$name.log"
  fi
}

# only the files that hold CUDA tests (collecting the whole suite would import every optional extra)
mapfile -t CUDA_TESTS < <(grep -l "mark.cuda" tests/*.py)
run pytest-cuda "$PY" -m pytest -q -p no:cacheprovider -m cuda "${CUDA_TESTS[@]}"
run bf16 "$PY" scripts/gpu_check.py bf16 --devices 1
run cache "$PY" scripts/gpu_check.py cache --devices 1
grep -E '^(ResNet-50|\|)' "$LOG/cache.log" || true  # the table for docs/feature-cache.md
for section in ddp_unfreeze syncbn fsdp fsdp2; do
  run "$section-1gpu" "$PY" scripts/gpu_check.py "$section" --devices 1
  if [ "$GPUS" -ge 2 ]; then
    run "$section-2gpu" "$PY" scripts/gpu_check.py "$section" --devices 2
  else
    SUMMARY+=("SKIP  $section-2gpu  (needs 2 GPUs, found $GPUS)")
  fi
done

echo
echo "===== GPU check summary (logs in $LOG) ====="
printf '%s\n' "${SUMMARY[@]}"
if [ "$FAILED" -ne 0 ]; then
  echo "GPU check FAILED"
  exit 1
fi
echo "GPU check passed"
