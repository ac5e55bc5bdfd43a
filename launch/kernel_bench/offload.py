"""Section ``offload``: ``store_kv_host`` for a 32K-token prefill layer against the D2H ceiling (default
grid and persistent grids), and a decode-sized store."""

from __future__ import annotations

import torch

from .common import BF16, D, DEV, HKV, MIB, P, K
from .timing import Runner, bench_ms, ceiling, gbps, ratio_note


def sec_offload(r: Runner, out: dict):
    t_tok = 32768
    g = torch.Generator(device=DEV).manual_seed(0)
    k = torch.randn((t_tok, HKV, D), generator=g, device=DEV).to(BF16)
    v = torch.randn((t_tok, HKV, D), generator=g, device=DEV).to(BF16)
    host_k = torch.empty((t_tok // P + 1, HKV, P, D), dtype=BF16, pin_memory=True)
    host_v = torch.empty((t_tok // P + 1, HKV, P, D), dtype=BF16, pin_memory=True)
    loc = torch.arange(t_tok, device=DEV) + P
    nbytes = 2 * k.numel() * 2
    t = bench_ms(lambda: K.store_kv_host(host_k, host_v, k, v, loc))
    out["prefill_32k_ms"], out["prefill_32k_gbps"] = t, gbps(nbytes, t)
    d2h = ceiling(r, "d2h_gbps")
    r.row("offload", f"store_kv_host 32K-token layer ({nbytes / MIB:.0f} MiB)", out["prefill_32k_gbps"], "GB/s",
          ratio_note(out["prefill_32k_gbps"], d2h, "D2H"))
    for nprog in (16, 32, 64):  # persistent grids (the asynchronous prefill offload uses 32)
        t = bench_ms(lambda: K.store_kv_host(host_k, host_v, k, v, loc, num_programs=nprog))
        out[f"prefill_32k_p{nprog}_gbps"] = gbps(nbytes, t)
        r.row("offload", f"store_kv_host 32K-token layer, {nprog} programs", out[f"prefill_32k_p{nprog}_gbps"],
              "GB/s", ratio_note(out[f"prefill_32k_p{nprog}_gbps"], d2h, "D2H"))
    loc_d = torch.randperm(t_tok, generator=g, device=DEV)[:32] + P
    t = bench_ms(lambda: K.store_kv_host(host_k, host_v, k[:32], v[:32], loc_d))
    out["decode_b32_us"] = 1e3 * t
    r.row("offload", "store_kv_host decode, 32 tokens", out["decode_b32_us"], "us")
