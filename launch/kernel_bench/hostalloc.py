"""Section ``hostalloc``: start-up cost of the host tier, page-locking a large buffer with each allocator."""

from __future__ import annotations

import os
import time

import torch

from .common import BF16, D, DEV, HKV, MIB, P
from .timing import Runner

LAYERS = 32  # the host tier is sized for 32 layers (Llama-3.1-8B)


def tier_gib(n_pages: int) -> float:
    """GiB of a 32-layer host tier of ``n_pages`` pages (K and V, bf16)."""
    return LAYERS * n_pages * 2 * HKV * P * D * 2 / 2**30


def sec_hostalloc(r: Runner, out: dict, quick: bool):
    """Start-up cost of the host tier: page-locking a large buffer with each allocator (the server pays
    it once; a 1 TB tier at 2 GB/s would take over 8 minutes)."""
    from freekv_sglang.runtime import host_store

    gib = 4 if quick else int(os.environ.get("FREEKV_BENCH_HOSTALLOC_GIB", "32"))
    page_bytes = 2 * HKV * P * D * 2  # K and V of one (page, layer), bf16
    n_pages = gib * 2**30 // (LAYERS * page_bytes)
    old = os.environ.get(host_store.HOST_ALLOC_ENV)
    try:
        for how in ("parallel", "sglang", "parallel"):
            os.environ[host_store.HOST_ALLOC_ENV] = how
            res = _pin_tier(host_store, how, n_pages)
            out.setdefault(how, []).append(res)
            sec, free_s = res["seconds"], res["release_seconds"]
            r.row("hostalloc", f"{how}: pin {tier_gib(n_pages):.1f} GiB host tier", sec, "s",
                  f"{tier_gib(n_pages) * 2**30 / sec / 1e9:.1f} GB/s; release {free_s:.1f} s; "
                  f"{'pinned, readable' if res['ok'] else 'NOT the allocator asked for or unreadable'}")
            r.save()
    finally:
        if old is None:
            os.environ.pop(host_store.HOST_ALLOC_ENV, None)
        else:
            os.environ[host_store.HOST_ALLOC_ENV] = old


def _pin_tier(host_store, how: str, n_pages: int) -> dict:
    """Allocate (and time) a host tier with allocator ``how``, check it is pinned and readable from the GPU,
    then release it (timed)."""
    t0 = time.perf_counter()
    st = host_store.HostKVStore(LAYERS, n_pages, HKV, P, D, BF16, pin=True)
    sec = time.perf_counter() - t0
    ok = st.allocator == how and st.buffer.is_pinned()
    probe = torch.empty(16 * MIB, dtype=torch.uint8, device=DEV)
    tail = st.buffer.view(-1).view(torch.uint8)[-16 * MIB:]
    tail.fill_(3)
    probe.copy_(tail, non_blocking=True)
    torch.cuda.synchronize()
    ok = ok and int(probe.sum()) == 3 * 16 * MIB
    t1 = time.perf_counter()
    st.close()
    del st, tail
    free_s = time.perf_counter() - t1
    return dict(gib=tier_gib(n_pages), seconds=sec, release_seconds=free_s, ok=ok)
