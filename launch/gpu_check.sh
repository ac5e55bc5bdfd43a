#!/usr/bin/env bash
# GPU check of a checkout on a CUDA machine: kernel + runtime tests, then end-to-end server tests.
# Usage (repo root): bash launch/gpu_check.sh [pytest -k expression for the e2e tests]
# The unit part alone (SKIP_E2E=1) takes about 5-6 minutes on an H200 (Triton compiles each variant).
# Logs go to $OUT (default ./gpu-check-out). Assumes SGLang 0.5.17 + FlashInfer are importable
# and this project is installed (pip install .).
set -uo pipefail
OUT="${OUT:-$PWD/gpu-check-out}"; mkdir -p "$OUT"; export OUT
K="${1:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton, flashinfer, sglang; print('torch', torch.__version__, 'triton', triton.__version__, 'flashinfer', flashinfer.__version__, 'sglang', sglang.__version__)" | tee -a "$OUT/card.txt"
t0=$(date +%s)
timeout "${UNIT_TIMEOUT:-540}" python3 -m pytest -q -x -p no:cacheprovider --durations=12 tests/gpu --ignore=tests/gpu/test_server_e2e.py \
  2>&1 | tee "$OUT/gpu-unit.log" | tail -25
echo "[gpu_check] unit tests rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 ))s"
if [[ "${SKIP_E2E:-0}" != 1 ]]; then
  t1=$(date +%s)
  timeout "${E2E_TIMEOUT:-400}" python3 -m pytest -q -s -x -p no:cacheprovider tests/gpu/test_server_e2e.py ${K:+-k "$K"} \
    2>&1 | tee "$OUT/gpu-e2e.log" | grep -v "^\s*$" | tail -40
  echo "[gpu_check] e2e rc=${PIPESTATUS[0]} in $(( $(date +%s) - t1 ))s"
fi
