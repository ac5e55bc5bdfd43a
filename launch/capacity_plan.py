"""Projected concurrent long requests, dense SGLang vs FreeKV, for given GPU and host memory.

A planning aid computed from FreeKV's sizing formulas (``freekv_sglang.runtime.sizing``), not a
measurement (``launch/bench_capacity.py`` measures it on a running server). Dense keeps every
request's whole KV in the GPU pool; FreeKV keeps it in the pinned host tier and spends GPU memory
on page digests (1/P of the KV) and one working set per running request, so its capacity is the
smaller of what the host tier holds and what the GPU pool holds in digests plus working sets.

Usage (any machine; MODEL is a folder with ``config.json``):
  python launch/capacity_plan.py --model MODEL --context 32000 --gpu-kv-gb 55 110 --host-gb 90 400 1000
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freekv_sglang.algorithm.layout import WorkingSetLayout  # noqa: E402
from freekv_sglang.config import FreeKVConfig  # noqa: E402
from freekv_sglang.runtime.sizing import (ModelShape, concurrent_requests, kv_bytes_per_token,  # noqa: E402
                                          shape_from_hf_config)
from freekv_sglang.server_config import read_hf_config  # noqa: E402


def model_shape(model: str) -> tuple[ModelShape, int]:
    """Attention shape (one GPU, bf16) and context length from the model folder's ``config.json``."""
    cfg = read_hf_config(model)
    if cfg is None:
        raise ValueError(f"no config.json in {model}")
    return shape_from_hf_config(cfg), int(cfg.get("text_config", cfg).get("max_position_embeddings", 131072))


def table(shape: ModelShape, layout: WorkingSetLayout, max_ctx: int, context: int, new_tokens: int,
          gpu_kv_gb, host_gb, kv_fp8: bool = False, freekv_gpu_kv_gb=None) -> str:
    """One row per (GPU pool, host tier); ``freekv_gpu_kv_gb`` (same length as ``gpu_kv_gb``, default
    the same values) is FreeKV's own GPU budget beside each dense pool."""
    g = 2**30
    tokens = context + new_tokens
    fk_pools = list(freekv_gpu_kv_gb) if freekv_gpu_kv_gb else list(gpu_kv_gb)
    if len(fk_pools) != len(gpu_kv_gb):
        raise ValueError(f"--freekv-gpu-kv-gb needs one value per --gpu-kv-gb ({len(gpu_kv_gb)}), got {len(fk_pools)}")
    lines = [f"{context}+{new_tokens}-token requests; dense KV {tokens * kv_bytes_per_token(shape) / g:.2f} GiB each",
             "", "| GPU KV pool GiB (dense / FreeKV) | host tier GiB | dense | FreeKV | FreeKV / dense "
             "| FreeKV bounded by | FreeKV + GPU tier | GPU tier GiB | with tier / dense |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for gk, fk in zip(gpu_kv_gb, fk_pools):
        for hg in host_gb:
            r = concurrent_requests(shape, layout, gpu_kv_bytes=int(gk * g), host_bytes=int(hg * g),
                                    request_tokens=tokens, max_context_len=max_ctx, kv_fp8=kv_fp8,
                                    freekv_gpu_kv_bytes=int(fk * g))
            ratio = f"{r['freekv'] / r['dense']:.1f}x" if r["dense"] else "-"
            n_tier, tier_gb = best_gpu_tier(shape, layout, fk, hg, tokens, max_ctx, kv_fp8=kv_fp8)
            tratio = f"{n_tier / r['dense']:.1f}x" if r["dense"] else "-"
            pool = f"{gk:g}" if fk == gk else f"{gk:g} / {fk:g}"
            lines.append(f"| {pool} | {hg:g} | {r['dense']} | {r['freekv']} | {ratio} | {r['freekv_bound']} "
                         f"| {n_tier} | {tier_gb:.1f} | {tratio} |")
    return "\n".join(lines)


def best_gpu_tier(shape: ModelShape, layout: WorkingSetLayout, gpu_kv_gb: float, host_gb: float, tokens: int,
                  max_ctx: int, steps: int = 100, kv_fp8: bool = False) -> tuple[int, float]:
    """The ``--freekv-gpu-tier-gb`` (searched in ``steps`` even steps of the GPU pool) that fits the most
    requests, and that number."""
    g = 2**30
    best = (-1, 0.0)
    for i in range(steps):
        tier = gpu_kv_gb * i / steps
        r = concurrent_requests(shape, layout, gpu_kv_bytes=int(gpu_kv_gb * g), host_bytes=int(host_gb * g),
                                request_tokens=tokens, max_context_len=max_ctx, gpu_tier_bytes=int(tier * g),
                                kv_fp8=kv_fp8)
        if r["freekv"] > best[0]:
            best = (r["freekv"], tier)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder with config.json")
    p.add_argument("--context", type=int, default=32000)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gpu-kv-gb", type=float, nargs="+", required=True,
                   help="GPU memory SGLang gives its KV pool (GiB; the 'KV Cache is allocated' log line)")
    p.add_argument("--freekv-gpu-kv-gb", type=float, nargs="+", default=None,
                   help="FreeKV's GPU budget beside each --gpu-kv-gb (GiB; the last figure of a FreeKV server's "
                        "'FreeKV memory:' log line). A FreeKV server prefills without chunking, so SGLang reserves "
                        "more activation memory and leaves less for KV than for dense (H200, Llama-3.1-8B shape: "
                        "100.3 against 112.4). Default: the --gpu-kv-gb values, which overstates FreeKV's GPU bound")
    p.add_argument("--host-gb", type=float, nargs="+", required=True, help="FreeKV host tier (GiB)")
    d = FreeKVConfig()
    p.add_argument("--page-size", type=int, default=d.page_size)
    p.add_argument("--sink-tokens", type=int, default=d.sink_tokens)
    p.add_argument("--select-tokens", type=int, default=d.select_tokens)
    p.add_argument("--window-tokens", type=int, default=d.window_tokens)
    p.add_argument("--overfetch-tokens", type=int, default=d.overfetch_tokens,
                   help="speculative over-fetch beyond the budget (--freekv-overfetch-tokens)")
    p.add_argument("--kv-storage", choices=("auto", "fp8_e4m3"), default="auto",
                   help="FreeKV's tiers in the model's dtype or FP8 (--freekv-kv-storage)")
    a = p.parse_args()
    try:
        shape, max_ctx = model_shape(a.model)
    except ValueError as e:
        p.error(str(e))
    try:
        layout = WorkingSetLayout.from_tokens(a.page_size, a.sink_tokens, a.select_tokens, a.window_tokens,
                                              a.overfetch_tokens)
    except ValueError as e:
        p.error(str(e))
    try:
        print(table(shape, layout, max_ctx, a.context, a.new_tokens, a.gpu_kv_gb, a.host_gb,
                    a.kv_storage == "fp8_e4m3", a.freekv_gpu_kv_gb))
    except ValueError as e:
        p.error(str(e))
    print("\n(projection from the sizing formulas; launch/bench_capacity.py measures a running server)")


if __name__ == "__main__":
    main()
