"""Section ``overlap``: SMs held by the gather (grid vs SM count) and the slowdown of a concurrent 8192^3
bf16 matmul on another stream."""

from __future__ import annotations

import torch

from .common import BF16, DEV, recall_mod
from .recall import RecallWork
from .timing import Runner, bench_ms, concurrent_ms, gbps, stream_ms


def sec_overlap(r: Runner, out: dict):
    work = r.state.get("recall_work") or RecallWork(8192, 32)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    lists, n_valid, nbytes = work.pieces(32, 1.0, seed=5)
    n_blocks = work.gather_blocks(lists)
    a = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    bm = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    c = torch.empty_like(a)

    def mm():
        torch.matmul(a, bm, out=c)

    s_mm, s_g = torch.cuda.Stream(), torch.cuda.Stream()
    for _ in range(3):
        mm()
    torch.cuda.synchronize()
    out["matmul_alone_ms"] = stream_ms(s_mm, mm)
    r.row("overlap", "8192^3 bf16 matmul alone", out["matmul_alone_ms"], "ms",
          f"{2 * 8192**3 / out['matmul_alone_ms'] / 1e9:.0f} TFLOP/s")
    for nprog in sorted({8, 16, 32, recall_mod.DEFAULT_NUM_PROGRAMS, sms, n_blocks}):
        if nprog > n_blocks:
            continue
        n_calls = 3
        g_alone = bench_ms(lambda: work.gather(lists, num_programs=nprog))
        mm_ms, g_ms = concurrent_ms(s_mm, mm, s_g, lambda: work.gather(lists, num_programs=nprog), n_calls)
        res = dict(grid=nprog, sm_count=sms, matmul_ms=mm_ms,
                   gather_gbps_alone=gbps(nbytes, g_alone), gather_gbps_concurrent=gbps(n_calls * nbytes, g_ms))
        res["matmul_slowdown"] = res["matmul_ms"] / out["matmul_alone_ms"] - 1
        out[f"grid_{nprog}"] = res
        r.row("overlap", f"gather grid {nprog} ({min(nprog, sms)}/{sms} SMs): matmul slowdown", 100 * res["matmul_slowdown"],
              "%", f"gather {res['gather_gbps_concurrent']:.1f} GB/s concurrent, {res['gather_gbps_alone']:.1f} alone")
        r.save()
