"""Section ``interfere``: the runtime's recall (``recall_selected``) by grid size and warps per program
beside a decode-like memory-bound victim on another stream (16 x 4096 @ 4096 x 28672 bf16 matmuls: weight
streaming, as a decode step at batch 16 does): the victim's slowdown and the recall's GB/s."""

from __future__ import annotations

import torch

from .common import BF16, DEV
from .recall import RecallWork
from .timing import Runner, bench_ms, concurrent_ms, gbps, stream_ms


def sec_interfere(r: Runner, out: dict):
    work = r.state.get("recall_work") or RecallWork(8192, 32)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    sel, n_sel, sel_bytes = work.selected_lists(16, 0.25, seed=300)  # batch 16, a quarter of the slots missing
    x = torch.randn(16, 4096, device=DEV, dtype=BF16)
    w = torch.randn(4096, 28672, device=DEV, dtype=BF16)
    y = torch.empty(16, 28672, device=DEV, dtype=BF16)
    reps = 20

    def victim():
        for _ in range(reps):
            torch.matmul(x, w, out=y)

    s_v, s_r = torch.cuda.Stream(), torch.cuda.Stream()
    victim()
    torch.cuda.synchronize()
    v_alone = stream_ms(s_v, victim, reps=7)
    out["victim_alone_ms"] = v_alone
    r.row("interfere", f"victim: {reps} x (16x4096 @ 4096x28672) bf16 alone", v_alone, "ms",
          f"{reps * w.numel() * 2 / v_alone / 1e6:.0f} GB/s weight streaming")
    for nprog in (8, 16, 32, 64, sms):
        for warps in (2, 4, 8):
            def rec():
                work.selected(sel, num_programs=nprog, num_warps=warps)

            t_alone = bench_ms(rec)
            n_calls = max(1, round(v_alone / t_alone))
            v_ms, r_ms = concurrent_ms(s_v, victim, s_r, rec, n_calls)
            res = dict(programs=nprog, warps=warps, recall_gbps_alone=gbps(sel_bytes, t_alone),
                       recall_gbps_concurrent=gbps(n_calls * sel_bytes, r_ms), victim_ms=v_ms)
            res["victim_slowdown"] = res["victim_ms"] / v_alone - 1
            out[f"p{nprog}_w{warps}"] = res
            r.row("interfere", f"recall {nprog:>3} programs x {warps} warps: victim slowdown", 100 * res["victim_slowdown"],
                  "%", f"recall {res['recall_gbps_concurrent']:.1f} GB/s concurrent, {res['recall_gbps_alone']:.1f} alone")
        r.save()
