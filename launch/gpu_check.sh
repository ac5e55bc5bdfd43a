#!/usr/bin/env bash
# GPU check of a checkout on a CUDA machine: kernel + runtime tests, then end-to-end server tests.
# Usage (repo root): bash launch/gpu_check.sh [pytest -k expression for the e2e tests]
# The unit tests are collected once and dealt round-robin over UNIT_SHARDS parallel pytest processes (default
# 8: Triton compilation and the float32 CPU references are CPU-bound, and round-robin spreads each file's slow
# cases over the shards; four file groups took more than 8 minutes on an H100 with 16 cores); a file that fails
# to collect fails the check. The e2e tests (server tests and SGLang's load generator against a FreeKV server)
# start about twenty servers one after the other
# (about 25 minutes on one GPU; E2E_GPUS=1,2,3 deals them over one lane per GPU). Logs go to $OUT
# (default ./gpu-check-out). Then, when the real model's folder is present (FREEKV_SMOLLM2, or the default
# model converted by `python -m freekv_sglang.default_model`), the real-model checks
# (tests/gpu/test_server_smollm2.py and test_server_needle.py, about 15 minutes: 9 servers of the small model started one after the other; SKIP_SMOLLM2=1 skips them). Assumes SGLang 0.5.17 +
# FlashInfer are importable and this project is installed (pip install .).
set -uo pipefail
OUT="${OUT:-$PWD/gpu-check-out}"; mkdir -p "$OUT"; export OUT
K="${1:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton, flashinfer, sglang; print('torch', torch.__version__, 'triton', triton.__version__, 'flashinfer', flashinfer.__version__, 'sglang', sglang.__version__)" | tee -a "$OUT/card.txt"
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "[gpu_check] no CUDA device: every test would skip, so there is nothing to check"; exit 1; }
t0=$(date +%s)
PT=(python3 -m pytest -q -p no:cacheprovider --durations=8 --tb=short)
UNIT_FILES=(tests/gpu/test_kernels_gpu.py tests/gpu/test_kernels_fused_gpu.py tests/gpu/test_kernels_graph.py
            tests/gpu/test_kernels_sparse_decode.py tests/gpu/test_kernels_grid_codes_gpu.py
            tests/gpu/test_kernels_overfetch_gpu.py tests/gpu/test_runtime_engine_gpu.py tests/gpu/test_runtime_graph.py
            tests/gpu/test_host_store_gpu.py tests/gpu/test_prefix_attention_gpu.py)
SHARDS="${UNIT_SHARDS:-8}"
python3 -m pytest -q -p no:cacheprovider --collect-only "${UNIT_FILES[@]}" > "$OUT/gpu-unit-collect.log" 2>&1
collect_rc=$?
grep "::" "$OUT/gpu-unit-collect.log" > "$OUT/gpu-unit-ids.txt"
n_ids=$(wc -l < "$OUT/gpu-unit-ids.txt")
if [[ $collect_rc -ne 0 || $n_ids -eq 0 ]]; then
  echo "[gpu_check] collecting the unit tests failed (rc=$collect_rc, $n_ids collected):"
  grep -E "^(ERROR|E )" "$OUT/gpu-unit-collect.log" | head -20
  exit 1
fi
echo "[gpu_check] $n_ids unit tests in $SHARDS shards"
pids=()
for ((i = 0; i < SHARDS; i++)); do
  awk -v s="$SHARDS" -v i="$i" '(NR - 1) % s == i' "$OUT/gpu-unit-ids.txt" > "$OUT/gpu-unit-$i.ids"
  [[ -s "$OUT/gpu-unit-$i.ids" ]] || break  # fewer tests than shards
  mapfile -t ids < "$OUT/gpu-unit-$i.ids"
  timeout "${UNIT_TIMEOUT:-600}" "${PT[@]}" "${ids[@]}" > "$OUT/gpu-unit-$i.log" 2>&1 &
  pids+=($!)
done
unit_rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  echo "[gpu_check] unit shard $i ($(wc -l < "$OUT/gpu-unit-$i.ids") tests): rc=$rc; $(tail -1 "$OUT/gpu-unit-$i.log")"
  [[ $rc -ne 0 ]] && { unit_rc=$rc; grep -E "^(FAILED|ERROR)" "$OUT/gpu-unit-$i.log" | head -20; }
done
echo "[gpu_check] unit tests rc=$unit_rc in $(( $(date +%s) - t0 ))s"
e2e_rc=0
if [[ "${SKIP_E2E:-0}" != 1 ]]; then
  # the server tests, one pytest lane per GPU of E2E_GPUS (launch/e2e_lanes.py; default: one lane on the first
  # visible GPU)
  vis="${CUDA_VISIBLE_DEVICES:-0}"
  gpus="${E2E_GPUS:-${vis%%,*}}"
  t1=$(date +%s)
  python3 launch/e2e_lanes.py --gpus "$gpus" --out "$OUT/e2e" \
    --timeout "${E2E_TIMEOUT:-1800}" ${K:+-k "$K"} 2>&1 | tee "$OUT/gpu-e2e.log"
  e2e_rc=${PIPESTATUS[0]}
  echo "[gpu_check] e2e rc=$e2e_rc in $(( $(date +%s) - t1 ))s (lane logs in $OUT/e2e)"
fi
real_rc=0
if [[ "${SKIP_SMOLLM2:-0}" != 1 ]]; then
  smol="${FREEKV_SMOLLM2:-}"
  if [[ -z "$smol" ]]; then
    smol=$(python3 -c "from freekv_sglang import default_model as m; d = m.default_cache_dir(); print(d if m.is_converted(d) else '')")
  fi
  if [[ -n "$smol" && -d "$smol" ]]; then
    t2=$(date +%s)
    FREEKV_SMOLLM2="$smol" timeout "${SMOLLM2_TIMEOUT:-1500}" "${PT[@]}" -s tests/gpu/test_server_smollm2.py \
      tests/gpu/test_server_needle.py \
      > "$OUT/gpu-smollm2.log" 2>&1
    real_rc=$?
    echo "[gpu_check] real-model checks (SmolLM2 in $smol): rc=$real_rc in $(( $(date +%s) - t2 ))s; $(tail -1 "$OUT/gpu-smollm2.log")"
  else
    echo "[gpu_check] real-model checks skipped: no SmolLM2 folder (set FREEKV_SMOLLM2 or run python -m freekv_sglang.default_model)"
  fi
fi
[[ $unit_rc -eq 0 && $e2e_rc -eq 0 && $real_rc -eq 0 ]]
