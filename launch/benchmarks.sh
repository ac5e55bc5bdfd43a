#!/usr/bin/env bash
# The benchmarks behind docs/BENCHMARKS.md, one section per argument (default: all, in this order).
# Run on a CUDA machine with SGLang and FlashInfer, from the repository root:
#
#   OUT=results MODEL=path/to/llama-8b-shape bash launch/benchmarks.sh kernels decode32k long capacity
#
# Sections:
#   kernels    launch/bench_kernels.py (ceilings, recall, interference, offload, scoring, attention, host allocation)
#   decode32k  bench_decode at 32K, batch 1-16: dense, FreeKV, speculation off, ArkVale-style, paper's recall,
#              transfers skipped (the headline table and its ratios), at the calibrated query locality, and
#              FreeKV at the optimistic fixed cosine beside them (mode freekv%$COS)
#   long       bench_decode at 8K / 64K / 128K, batch 1-32 where they fit: dense, FreeKV, sync, skip, and FreeKV at
#              the optimistic cosine (static memory fraction 0.7 for every mode: dense prefills a 128K prompt in one
#              forward)
#   capacity   bench_capacity: concurrent 32K requests, dense vs FreeKV (host tier) vs FreeKV + GPU tier
#   overlap    bench_overlap: SGLang's overlap scheduler on/off, served end to end
#   qwen       bench_decode at 32K on the Qwen2.5-7B shape
#   attention  bench_decode at 32K, batch 1 and 8: the working-set attention kernels (the Triton split decode, the
#              default; FlashInfer paged decode) against dense, two interleaved rounds (median, spread)
#   serve      bench_serve: SGLang's bench_serving against dense, dense FP8 KV, FreeKV, transfers skipped and the
#              overlap opt-in; 32K and mixed 4K-128K prompts, concurrency 4/16/64 (about 1.5-2 hours; not by default)
#   overfetch  bench_decode at 32K, batch 1/8/16, two interleaved rounds: FreeKV with speculative over-fetch of
#              8/16/32 pages (--freekv-overfetch-tokens 256/512/1024) against FreeKV, speculation off and dense
#              (not by default)
# Each writes its log, JSON, Markdown table and plot under $OUT/<section>/.
# Query locality of the FreeKV modes (dummy weights make every query unrelated to the last): LOCALITY, by default
# `calibrated` (SmolLM2-135M's measured correction rate and page change per layer and KV head,
# docs/data/locality-smollm2-135m.json; `calibrated:PATH` for another measurement); the optimistic fixed cosine COS
# (0.95: almost no correction after the first step) runs as the extra mode freekv%$COS.
set -uo pipefail
OUT="${OUT:-bench-out}"
MODEL="${MODEL:-.gpu-bundle/models/llama-8b-shape}"
QWEN="${QWEN:-.gpu-bundle/models/qwen2.5-7b-shape}"
HOST_GB="${HOST_GB:-90}"          # capacity: FreeKV's host tier
GPU_TIER_GB="${GPU_TIER_GB:-80}"  # capacity: the GPU tier of mode freekv-tier (launch/capacity_plan.py suggests one)
LONG_HOST_GB="${LONG_HOST_GB:-auto}"  # long: FreeKV's host tier (auto: the largest cell, up to 80% of free memory)
LOCALITY="${LOCALITY:-calibrated}"  # synthetic query locality of the FreeKV modes (launch/bench_decode.py --locality)
COS="${COS:-0.95}"                # the optimistic fixed consecutive-query cosine (modes freekv%$COS)
BD=(python3 launch/bench_decode.py --model "$MODEL" --output-len 64 --locality "$LOCALITY")

run() {  # section name, command...
  local name=$1; shift
  mkdir -p "$OUT/$name"
  echo "[benchmarks] $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name/$name.log" 2>&1
  local rc=$?
  echo "[benchmarks] $name: rc=$rc in $((SECONDS - t0)) s (log $OUT/$name/$name.log)"
  tail -20 "$OUT/$name/$name.log"
  return $rc
}

sections=("$@")
[[ ${#sections[@]} -eq 0 ]] && sections=(kernels decode32k long capacity overlap qwen)
status=0
for s in "${sections[@]}"; do
  case "$s" in
    kernels) run kernels python3 launch/bench_kernels.py --json "$OUT/kernels/bench_kernels.json" ;;
    decode32k) run decode32k "${BD[@]}" --contexts 32000 --batch-sizes 1 4 8 16 \
        --modes dense freekv sync arkvale staged skip "freekv%$COS" --timeout 330 --out "$OUT/decode32k" ;;
    long) run long "${BD[@]}" --contexts 8000 65536 130000 --batch-sizes 1 4 8 16 32 --host-gb "$LONG_HOST_GB" \
        --prefill-tokens-per-forward 131072 --modes dense freekv sync skip "freekv%$COS" --timeout 480 --out "$OUT/long" \
        -- --mem-fraction-static 0.7 ;;
    capacity) run capacity python3 launch/bench_capacity.py --model "$MODEL" --context 32000 --host-gb "$HOST_GB" \
        --max-requests 128 --new-tokens 256 --modes dense freekv freekv-tier --gpu-tier-gb "$GPU_TIER_GB" \
        --out "$OUT/capacity" ;;
    overlap) run overlap python3 launch/bench_overlap.py --model "$MODEL" --contexts 32000 --batch-sizes 1 8 \
        --modes dense dense-no-overlap freekv freekv-overlap --locality "$LOCALITY" --out "$OUT/overlap" ;;
    qwen) run qwen python3 launch/bench_decode.py --model "$QWEN" --output-len 64 --locality "$LOCALITY" \
        --contexts 32000 --batch-sizes 1 4 8 16 --modes dense freekv sync arkvale skip "freekv%$COS" --timeout 200 \
        --out "$OUT/qwen" \
        -- --tokenizer-path "$MODEL" ;;
    attention) run attention "${BD[@]}" --contexts 32000 --batch-sizes 1 8 --rounds 2 \
        --modes dense freekv freekv:flashinfer --timeout 200 --out "$OUT/attention" ;;
    serve) run serve python3 launch/bench_serve.py --model "$MODEL" --locality "$LOCALITY" --out "$OUT/serve" ;;
    overfetch) run overfetch "${BD[@]}" --contexts 32000 --batch-sizes 1 8 16 --rounds 2 \
        --modes dense freekv freekv-over256 freekv-over512 freekv-over1024 sync --timeout 330 --out "$OUT/overfetch" ;;
    *) echo "unknown section $s (kernels decode32k long capacity overlap qwen attention serve overfetch)"; exit 2 ;;
  esac
  rc=$?
  [[ $rc -ne 0 ]] && status=$rc
done
exit $status
