#!/usr/bin/env python
"""Benchmark of the FreeKV data-path kernels on one GPU (a few minutes).

Sections (each guarded: an error is printed and recorded, the rest still runs; the JSON
file is rewritten after every section):

* ``ceilings``    bulk pinned H2D / D2H copies (256 MiB) and an HBM device copy (1 GiB);
* ``recall``      ``recall_selected`` (the runtime's path, CUDA graph) and
                  ``recall_gather`` / ``recall_staged`` / ``recall_per_page`` GB/s on
                  Llama-3.1-8B-shaped work (Hkv=8, D=128, P=32, 32 pages per head), batch
                  1/8/32, all pages missing and ~15% missing, vs the H2D ceiling; a sweep of
                  the gather's persistent grid size;
* ``overlap``     SMs held by the gather (grid vs SM count) and the slowdown of a concurrent
                  8192^3 bf16 matmul on another stream;
* ``interfere``   the runtime's recall (``recall_selected``) by grid size and warps per program,
                  beside a decode-like memory-bound victim on another stream (16 x 4096 @ 4096 x
                  28672 bf16 matmuls: weight streaming, as a decode step at batch 16 does): the
                  victim's slowdown and the recall's GB/s, to choose the recall's shape;
* ``offload``     ``store_kv_host`` for a 32K-token prefill layer vs the D2H ceiling, and a
                  decode-sized store;
* ``scores``      ``score_and_select`` (the runtime's fused scoring + top-k + residency) and the
                  unfused ``score_pages`` + ``select_and_diff`` at 32K / 128K contexts, batch 1/8,
                  vs reading the digests at the measured HBM speed;
* ``decode``      ``SparseDecode`` over a 2048-token working set vs FlashInfer dense paged
                  decode over 32K tokens (page size 1 and 32), batch 1/8/32, 32 q / 8 kv heads;
* ``step``        the same attention (FlashInfer and the Triton split decode) and the fused selection
                  per layer as a captured decode step runs them: 8 layers over their own buffers in
                  one CUDA graph, replay time / 8; the selection's launch order and program shape.

Timings: ``triton.testing.do_bench`` medians (it flushes L2 before every call); "graph"
figures replay the op captured in a CUDA graph (GPU time without Python launch cost);
host-synchronising recalls are timed wall-clock around a device sync.

Usage: ``python launch/bench_kernels.py --json bench_kernels.json [--sections a,b] [--quick]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch


try:
    import freekv_sglang.kernels as K
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import freekv_sglang.kernels as K
from freekv_sglang.algorithm import WorkingSetLayout  # noqa: E402
from freekv_sglang.kernels import recall as recall_mod  # noqa: E402
from freekv_sglang.kernels.common import sm_count  # noqa: E402

MIB = 2**20
DEV = torch.device("cuda")
BF16 = torch.bfloat16
# Llama-3.1-8B shape
HQ, HKV, D, P, NSEL = 32, 8, 128, 32, 32
LAYOUT = WorkingSetLayout(P, 16, NSEL, 16)  # 2048 tokens: 16 sink + 32 selected + 16 window pages


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def bench_ms(fn, warmup=10, rep=50) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def wall_ms(fn, reps=3, warmup=1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(fn, warmup=5, rep=40) -> float:
    """GPU time of ``fn`` captured in a CUDA graph (one call per replay, L2 flushed between)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench_ms(g.replay, warmup=warmup, rep=rep)


class Runner:
    def __init__(self, json_path: str | None):
        self.json_path = json_path
        self.results: dict = {}
        self.rows: list[tuple] = []
        self.state: dict = {}  # shared between sections (ceilings, recall buffers)

    def save(self):
        if not self.json_path:
            return
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        os.replace(tmp, self.json_path)

    def row(self, section, item, value, unit="", note=""):
        self.rows.append((section, item, value, unit, note))
        v = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"  [{section}] {item}: {v} {unit} {note}".rstrip(), flush=True)

    def section(self, name, fn, *args):
        print(f"== {name}", flush=True)
        t0 = time.time()
        out: dict = {}
        self.results[name] = out
        try:
            fn(self, out, *args)
        except Exception as e:  # keep going: one failing section must not lose the others
            traceback.print_exc()
            out["error"] = f"{type(e).__name__}: {e}"
            self.row(name, "ERROR", f"{type(e).__name__}: {str(e)[:100]}")
        out["seconds"] = round(time.time() - t0, 2)
        self.save()
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        torch.cuda.empty_cache()

    def table(self):
        print("\n" + "=" * 110)
        print(f"{'section':<9} {'metric':<58} {'value':>12} {'unit':<8} note")
        print("-" * 110)
        for sec, item, value, unit, note in self.rows:
            v = f"{value:12.4g}" if isinstance(value, float) else f"{str(value):>12}"
            print(f"{sec:<9} {item:<58} {v} {unit:<8} {note}")
        print("=" * 110)


# ------------------------------------------------------------------------------------------
def sec_info(r: Runner, out: dict):
    import triton
    try:
        import flashinfer
        fi = getattr(flashinfer, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        fi = f"unavailable ({type(e).__name__})"
    props = torch.cuda.get_device_properties(DEV)
    out.update(device=torch.cuda.get_device_name(), sm_count=props.multi_processor_count,
               memory_gib=round(props.total_memory / 2**30, 1), l2_mib=round(getattr(props, "L2_cache_size", 0) / MIB, 1),
               torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__, flashinfer=fi,
               gather_default_programs=recall_mod.DEFAULT_NUM_PROGRAMS)
    for k, v in out.items():
        r.row("info", k, v)


def pinned_copy_gbps(n: int = 256 * MIB) -> tuple[float, float]:
    """``(host-to-device, device-to-host)`` GB/s of ``n``-byte copies between pinned host memory and
    the GPU: the PCIe ceilings (also measured by ``bench_decode.py`` before its modes)."""
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host.fill_(7)
    dev = torch.empty(n, dtype=torch.uint8, device=DEV)
    return (gbps(n, bench_ms(lambda: dev.copy_(host, non_blocking=True))),
            gbps(n, bench_ms(lambda: host.copy_(dev, non_blocking=True))))


def sec_ceilings(r: Runner, out: dict):
    n = 256 * MIB
    out["h2d_gbps"], out["d2h_gbps"] = pinned_copy_gbps(n)
    a = torch.empty(4 * n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    out["hbm_copy_gbps"] = gbps(2 * a.numel(), bench_ms(lambda: b.copy_(a)))  # read + write bytes
    r.row("ceiling", "pinned H2D copy 256 MiB", out["h2d_gbps"], "GB/s")
    r.row("ceiling", "pinned D2H copy 256 MiB", out["d2h_gbps"], "GB/s")
    r.row("ceiling", "HBM device copy 1 GiB (read+write bytes)", out["hbm_copy_gbps"], "GB/s")
    r.state.update(out)


def _ceil(r: Runner, key: str) -> float | None:
    return r.state.get(key)


def safe(r: Runner, section: str, what: str, fn):
    """Run one measurement; on error record it and return None (the section goes on)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        r.row(section, f"{what}: ERROR", f"{type(e).__name__}: {str(e)[:80]}")
        return None


class RecallWork:
    """Host store (pinned) + working set + piece lists of Llama-8B-shaped recalls."""

    def __init__(self, n_host_pages: int, max_batch: int):
        self.host_k = torch.empty((n_host_pages, HKV, P, D), dtype=BF16, pin_memory=True)
        self.host_v = torch.empty((n_host_pages, HKV, P, D), dtype=BF16, pin_memory=True)
        self.ws_k = torch.empty((max_batch * LAYOUT.slots, P, HKV, D), dtype=BF16, device=DEV)
        self.ws_v = torch.empty_like(self.ws_k)
        self.n_host = n_host_pages

    def pieces(self, b: int, frac: float, seed: int = 0):
        g = torch.Generator(device=DEV).manual_seed(seed)
        page = torch.randint(1, self.n_host, (b, HKV, NSEL), generator=g, device=DEV)
        slot = (torch.arange(b, device=DEV) * LAYOUT.slots + LAYOUT.n_sink).view(b, 1, 1) + torch.arange(NSEL, device=DEV)
        slot = slot.expand(b, HKV, NSEL)
        head = torch.arange(HKV, device=DEV).view(1, HKV, 1).expand(b, HKV, NSEL)
        valid = torch.rand((b, HKV, NSEL), generator=g, device=DEV) < frac
        # compacted like pieces_from_selection: valid pieces first
        order = torch.argsort((~valid).reshape(-1).to(torch.int8), stable=True)
        v = valid.reshape(-1)[order]
        lists = [torch.where(v, x.reshape(-1)[order], -1).int().contiguous() for x in (page, slot, head)]
        n_valid = int(valid.sum())
        return lists, n_valid, n_valid * 2 * P * D * 2

    def selected_lists(self, b: int, frac: float, seed: int = 0):
        """Inputs of ``recall_selected`` (the runtime's path): per (request, KV head) recall lists
        with ``frac`` of the ``NSEL`` slots missing (valid entries first), and a req_to_token map
        from logical pages to random host pages."""
        g = torch.Generator(device=DEV).manual_seed(seed)
        n_logical = 1024
        host_page = torch.randint(1, self.n_host, (b, n_logical), generator=g, device=DEV)
        r2t = (host_page[:, :, None] * P + torch.arange(P, device=DEV)).reshape(b, -1).int().contiguous()
        valid = torch.rand((b, HKV, NSEL), generator=g, device=DEV) < frac
        n_valid_row = valid.sum(-1, keepdim=True)
        t = torch.arange(NSEL, device=DEV)
        ok = t < n_valid_row
        slot = torch.where(ok, t, -1).int()
        page = torch.where(ok, torch.randint(0, n_logical, (b, HKV, NSEL), generator=g, device=DEV), -1).int()
        rows = torch.arange(b, device=DEV)
        n_valid = int(valid.sum())
        return (slot, page, r2t, rows), n_valid, n_valid * 2 * P * D * 2

    def selected(self, lists, **kw):
        slot, page, r2t, rows = lists
        K.recall_selected(self.host_k, self.host_v, self.ws_k, self.ws_v, slot, page, r2t, rows, page_size=P,
                          slot_base=LAYOUT.slots, select_slot0=LAYOUT.n_sink, **kw)

    def gather(self, lists, **kw):
        K.recall_gather(self.host_k, self.host_v, self.ws_k, self.ws_v, *lists, **kw)

    def staged(self, lists):
        K.recall_staged(self.host_k, self.host_v, self.ws_k, self.ws_v, *lists)

    def per_page(self, lists):
        K.recall_per_page(self.host_k, self.host_v, self.ws_k, self.ws_v, *lists)


def sec_recall(r: Runner, out: dict, quick: bool):
    work = RecallWork(4096 if quick else 8192, 32)
    r.state["recall_work"] = work
    h2d = _ceil(r, "h2d_gbps")
    batches = (1, 8) if quick else (1, 8, 32)
    for b in batches:
        for frac in (1.0, 0.15):
            lists, n_valid, nbytes = work.pieces(b, frac, seed=b)
            tag = f"b={b} {'all' if frac == 1.0 else '15%'} missing ({nbytes / MIB:.1f} MiB)"
            res = {"pieces": n_valid, "bytes": nbytes}
            t = bench_ms(lambda: work.gather(lists))
            res["gather_ms"], res["gather_gbps"] = t, gbps(nbytes, t)
            note = f"{res['gather_gbps'] / h2d:.2f}x H2D" if h2d else ""
            r.row("recall", f"gather   {tag}", res["gather_gbps"], "GB/s", note)
            reps = 2 if (b >= 32 and frac == 1.0) else 3
            for name, fn in (("staged", work.staged), ("per_page", work.per_page)):
                t = safe(r, "recall", f"{name} {tag}", lambda: wall_ms(lambda: fn(lists), reps=reps))
                if t is None:
                    continue
                res[f"{name}_ms"], res[f"{name}_gbps"] = t, gbps(nbytes, t)
                r.row("recall", f"{name.replace('_', '-'):<8} {tag}", res[f"{name}_gbps"], "GB/s",
                      f"{res[f'{name}_gbps'] / h2d:.2f}x H2D" if h2d else "")
            sel, n_sel, sel_bytes = work.selected_lists(b, frac, seed=b)
            t = graph_ms(lambda: work.selected(sel))
            res["selected_graph_gbps"] = gbps(sel_bytes, t)
            r.row("recall", f"selected (runtime path), graph b={b} {'all' if frac == 1.0 else '15%'} missing "
                  f"({sel_bytes / MIB:.1f} MiB)", res["selected_graph_gbps"], "GB/s",
                  f"{res['selected_graph_gbps'] / h2d:.2f}x H2D" if h2d else "")
            out[f"b{b}_{'all' if frac == 1.0 else 'p15'}"] = res
            r.save()
    # persistent grid sweep
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    for b, frac in ((8, 1.0), (8, 0.15)):
        lists, n_valid, nbytes = work.pieces(b, frac, seed=100 + b)
        n_blocks = math.ceil(lists[0].numel() * P / max(1, min(8192 // D, 256)))
        sweep = {}
        for nprog in sorted({8, 16, 32, 64, sms, 2 * sms, 8 * sms, n_blocks}):
            if nprog > n_blocks:
                continue
            t = bench_ms(lambda: work.gather(lists, num_programs=nprog))
            sweep[nprog] = gbps(nbytes, t)
            r.row("recall", f"gather grid={nprog:<5} b={b} {'all' if frac == 1.0 else '15%'} missing", sweep[nprog],
                  "GB/s", f"{nprog / sms:.2f} programs/SM")
        out[f"grid_sweep_b{b}_{'all' if frac == 1.0 else 'p15'}"] = sweep
    # the runtime's selected-page recall over per-(request, head) lists, by grid size
    for b, frac in ((8, 1.0), (8, 0.15)):
        sel, n_sel, sel_bytes = work.selected_lists(b, frac, seed=200 + b)
        sweep = {}
        for nprog in sorted({8, 16, 32, 64, sms}):
            t = graph_ms(lambda: work.selected(sel, num_programs=nprog))
            sweep[nprog] = gbps(sel_bytes, t)
            r.row("recall", f"selected grid={nprog:<5} b={b} {'all' if frac == 1.0 else '15%'} missing, graph",
                  sweep[nprog], "GB/s", f"{sweep[nprog] / h2d:.2f}x H2D" if h2d else "")
        out[f"selected_grid_sweep_b{b}_{'all' if frac == 1.0 else 'p15'}"] = sweep
    # the runtime's recall with a GPU tier (--freekv-gpu-tier-gb): pages past the host tier's come from HBM
    gk = torch.empty_like(work.host_k, device=DEV)
    gv = torch.empty_like(work.host_v, device=DEV)
    sel, n_sel, sel_bytes = work.selected_lists(8, 1.0, seed=300)
    for split, what in ((1, "all pages in the GPU tier"), (work.n_host // 2, "half the pages in the GPU tier")):
        def tiered(split=split):
            slot, page, r2t, rows = sel
            K.recall_selected(work.host_k[:split], work.host_v[:split], work.ws_k, work.ws_v, slot, page, r2t, rows,
                              page_size=P, slot_base=LAYOUT.slots, select_slot0=LAYOUT.n_sink,
                              gpu_k=gk[: work.n_host - split], gpu_v=gv[: work.n_host - split])

        t = safe(r, "recall", f"selected with GPU tier ({what})", lambda: graph_ms(tiered))
        if t is not None:
            key = "selected_gpu_tier_all" if split == 1 else "selected_gpu_tier_half"
            out[key + "_gbps"] = gbps(sel_bytes, t)
            r.row("recall", f"selected (runtime path), graph b=8 all missing, {what}", out[key + "_gbps"], "GB/s",
                  f"{out[key + '_gbps'] / h2d:.2f}x H2D" if h2d else "")
    del gk, gv
    # graph replay (how the runtime launches it)
    lists, n_valid, nbytes = work.pieces(8, 1.0, seed=7)
    t = graph_ms(lambda: work.gather(lists))
    out["gather_graph_b8_all_gbps"] = gbps(nbytes, t)
    r.row("recall", "gather b=8 all missing, CUDA-graph replay", out["gather_graph_b8_all_gbps"], "GB/s")


def _run_on(stream, fn, n=1):
    """Record events around ``n`` calls of ``fn`` on ``stream``: ``(start, end)``."""
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        e0.record()
        for _ in range(n):
            fn()
        e1.record()
    return e0, e1


def stream_ms(stream, fn, reps=5) -> float:
    """Median GPU ms of ``fn`` alone on ``stream``."""
    times = []
    for _ in range(reps):
        e = _run_on(stream, fn)
        torch.cuda.synchronize()
        times.append(e[0].elapsed_time(e[1]))
    return statistics.median(times)


def concurrent_ms(fg_stream, fg, bg_stream, bg, n_bg, reps=5) -> tuple[float, float]:
    """Median GPU ms of ``fg`` on ``fg_stream`` while ``n_bg`` calls of ``bg`` run on ``bg_stream`` (launched
    first), and of those ``n_bg`` calls: ``(fg_ms, bg_ms)``."""
    fg_t, bg_t = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        eb = _run_on(bg_stream, bg, n_bg)
        ef = _run_on(fg_stream, fg)
        torch.cuda.synchronize()
        fg_t.append(ef[0].elapsed_time(ef[1]))
        bg_t.append(eb[0].elapsed_time(eb[1]))
    return statistics.median(fg_t), statistics.median(bg_t)


def sec_overlap(r: Runner, out: dict):
    work = r.state.get("recall_work") or RecallWork(8192, 32)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    lists, n_valid, nbytes = work.pieces(32, 1.0, seed=5)
    n_blocks = math.ceil(lists[0].numel() * P / max(1, min(8192 // D, 256)))
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
    d2h = _ceil(r, "d2h_gbps")
    r.row("offload", f"store_kv_host 32K-token layer ({nbytes / MIB:.0f} MiB)", out["prefill_32k_gbps"], "GB/s",
          f"{out['prefill_32k_gbps'] / d2h:.2f}x D2H" if d2h else "")
    for nprog in (16, 32, 64):  # persistent grids (the asynchronous prefill offload uses 32)
        t = bench_ms(lambda: K.store_kv_host(host_k, host_v, k, v, loc, num_programs=nprog))
        out[f"prefill_32k_p{nprog}_gbps"] = gbps(nbytes, t)
        r.row("offload", f"store_kv_host 32K-token layer, {nprog} programs", out[f"prefill_32k_p{nprog}_gbps"],
              "GB/s", f"{out[f'prefill_32k_p{nprog}_gbps'] / d2h:.2f}x D2H" if d2h else "")
    loc_d = torch.randperm(t_tok, generator=g, device=DEV)[:32] + P
    t = bench_ms(lambda: K.store_kv_host(host_k, host_v, k[:32], v[:32], loc_d))
    out["decode_b32_us"] = 1e3 * t
    r.row("offload", "store_kv_host decode, 32 tokens", out["decode_b32_us"], "us")


def sec_scores(r: Runner, out: dict, quick: bool):
    hbm = _ceil(r, "hbm_copy_gbps")
    for ctx in ((32768,) if quick else (32768, 131072)):
        for b in (1, 8):
            n_pages = ctx // P
            g = torch.Generator(device=DEV).manual_seed(ctx + b)
            dig = torch.randn((b * n_pages + 1, HKV, 2, D), generator=g, device=DEV).to(BF16)
            r2t = (P + torch.arange(b, device=DEV)[:, None] * ctx + torch.arange(ctx, device=DEV)).int()
            rpi = torch.arange(b, device=DEV)
            n_ctx = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
            q = torch.randn((b, HQ, D), generator=g, device=DEV).to(BF16)
            sc = torch.empty((b, HKV, n_pages), device=DEV)
            hs = torch.empty((b, HQ, n_pages), device=DEV)
            kw = dict(page_size=P, n_sink=LAYOUT.n_sink, n_window=LAYOUT.n_window)

            def score(agg="mean"):
                K.score_pages(q, dig, r2t, rpi, n_ctx, None, sc, aggregation=agg, head_scores=hs, **kw)

            score()
            resident = K.select_and_diff(sc + 0.1 * torch.randn(sc.shape, generator=g, device=DEV),
                                         torch.full((b, HKV, NSEL), -1, dtype=torch.long, device=DEV), None, NSEL).resident

            def select():
                K.select_and_diff(sc, resident, None, NSEL)

            def select_ref():
                K.select_and_diff_reference(sc, resident, None, NSEL)

            n_cand = n_pages - LAYOUT.n_sink - LAYOUT.n_window
            dbytes = b * HKV * n_cand * 2 * D * 2
            res = {"digest_bytes": dbytes}
            res["ideal_ms"] = dbytes / (hbm * 1e9) * 1e3 if hbm else None
            nan = float("nan")

            def m(what, fn):
                v = safe(r, "scores", f"{what} ctx={ctx} b={b}", fn)
                return nan if v is None else v

            res["score_ms"] = m("score eager", lambda: bench_ms(score))
            res["score_graph_ms"] = m("score graph", lambda: graph_ms(score))
            res["score_softmax_graph_ms"] = m("softmax graph", lambda: graph_ms(lambda: score("softmax-mean")))
            res["score_select_graph_ms"] = m("score+select graph", lambda: graph_ms(lambda: (score(), select())))
            res["score_select_eager_ms"] = m("score+select eager", lambda: bench_ms(lambda: (score(), select())))
            res["select_graph_ms"] = m("select graph", lambda: graph_ms(select))
            res["select_torch_graph_ms"] = m("torch select graph", lambda: graph_ms(select_ref))
            res["select_torch_eager_ms"] = m("torch select eager", lambda: bench_ms(select_ref))
            res_f = resident.clone()
            rs = torch.empty((b, HKV, NSEL), dtype=torch.int32, device=DEV)
            rp = torch.empty_like(rs)
            keys = torch.empty(K.score_select.selection_scratch_size(b, HKV, n_pages, NSEL), dtype=torch.int64,
                               device=DEV)

            def fused():
                K.score_and_select(q, dig, r2t, rpi, n_ctx, None, res_f, NSEL, rs, rp, max_pages=n_pages,
                                   aggregation="mean", keys=keys, **kw)

            res["fused_graph_ms"] = m("fused score+select graph", lambda: graph_ms(fused))
            tag = f"ctx={ctx // 1024}K b={b} ({dbytes / MIB:.1f} MiB digests)"
            ideal = res["ideal_ms"]
            r.row("scores", f"score_and_select (fused, runtime path), graph  {tag}", 1e3 * res["fused_graph_ms"], "us",
                  f"{res['fused_graph_ms'] / ideal:.2f}x HBM ideal" if ideal else "")
            r.row("scores", f"score_pages mean, graph  {tag}", 1e3 * res["score_graph_ms"], "us",
                  f"{res['score_graph_ms'] / ideal:.2f}x HBM ideal ({1e3 * ideal:.1f} us)" if ideal else "")
            r.row("scores", f"score_pages softmax-mean, graph  {tag}", 1e3 * res["score_softmax_graph_ms"], "us")
            r.row("scores", f"score+select (Triton), graph  {tag}", 1e3 * res["score_select_graph_ms"], "us",
                  f"eager {1e3 * res['score_select_eager_ms']:.0f} us")
            r.row("scores", f"select Triton / torch ref, graph  {tag}", 1e3 * res["select_graph_ms"], "us",
                  f"torch ref {1e3 * res['select_torch_graph_ms']:.0f} us graph, "
                  f"{1e3 * res['select_torch_eager_ms']:.0f} us eager")
            if b >= 8:  # tuning sweep of the fused path's scoring program (block pages x warps)
                sweep = {}
                for bn in (32, 64, 128, 256):
                    if bn > max(32, 1 << (n_pages - 1).bit_length()):
                        continue
                    for nw in (2, 4, 8):
                        kk = torch.empty(K.score_select.selection_scratch_size(b, HKV, n_pages, NSEL, bn),
                                         dtype=torch.int64, device=DEV)

                        def tuned(bn=bn, nw=nw, kk=kk):
                            K.score_and_select(q, dig, r2t, rpi, n_ctx, None, res_f, NSEL, rs, rp, max_pages=n_pages,
                                               aggregation="mean", keys=kk, block_n=bn, num_warps=nw, **kw)

                        t = m(f"fused block {bn} warps {nw}", lambda: graph_ms(tuned))
                        if t == t:  # not nan
                            sweep[f"block{bn}_warps{nw}"] = t
                if sweep:
                    best = min(sweep, key=sweep.get)
                    res["fused_sweep_ms"] = sweep
                    r.row("scores", f"score_and_select best of {len(sweep)} configs ({best}), graph  {tag}",
                          1e3 * sweep[best], "us", f"{sweep[best] / ideal:.2f}x HBM ideal" if ideal else "")
            out[f"ctx{ctx}_b{b}"] = res
            r.save()


def sec_decode(r: Runner, out: dict, quick: bool):
    batches = (1, 8) if quick else (1, 8, 32)
    ctx = 32768
    bmax = max(batches)
    g = torch.Generator(device=DEV).manual_seed(0)
    kv_k = torch.empty((bmax * ctx, HKV, D), dtype=BF16, device=DEV).normal_(generator=g)
    kv_v = torch.empty_like(kv_k).normal_(generator=g)
    ws_k = torch.randn((bmax * LAYOUT.slots, P, HKV, D), generator=g, device=DEV).to(BF16)
    ws_v = torch.randn_like(ws_k)
    for b in batches:
        q = torch.randn((b, HQ, D), generator=g, device=DEV).to(BF16)
        res = {}
        # sparse over the working sets (2048 tokens each)
        seq = torch.full((b,), ctx, dtype=torch.int32)
        ip = torch.empty(b + 1, dtype=torch.int32, device=DEV)
        ix = torch.empty(b * LAYOUT.slots, dtype=torch.int32, device=DEV)
        lp = torch.empty(b, dtype=torch.int32, device=DEV)
        K.build_page_table(seq.to(DEV), torch.arange(b, device=DEV), ip, ix, lp, layout=LAYOUT, slot_base=LAYOUT.slots)
        sd = K.SparseDecode(DEV)
        sd.plan(K.page_table_indptr_host(seq, LAYOUT), ix, K.last_page_len_host(seq, LAYOUT), HQ, HKV, D, P, BF16, BF16)
        res["sparse_ms"] = bench_ms(lambda: sd.run(q, ws_k, ws_v))
        for sp in (4, 8, 16):  # fixed KV splits (pages per program) against FlashInfer's own choice
            def split(sp=sp):
                w = K.SparseDecode(DEV)
                w.plan(K.page_table_indptr_host(seq, LAYOUT), ix, K.last_page_len_host(seq, LAYOUT), HQ, HKV, D, P,
                       BF16, BF16, split_pages=sp)
                return bench_ms(lambda: w.run(q, ws_k, ws_v))

            t = safe(r, "decode", f"sparse split {sp} pages b={b}", split)
            if t is not None:
                res[f"sparse_split{sp}_ms"] = t
                r.row("decode", f"SparseDecode, KV split every {sp} pages, b={b}", 1e3 * t, "us",
                      f"{res['sparse_ms'] / t:.2f}x FlashInfer's own split")
        # the same attention with each (slot, head) page contiguous (HND), and with FlashInfer's decode kernels
        ws_k_hnd, ws_v_hnd = ws_k.transpose(1, 2).contiguous(), ws_v.transpose(1, 2).contiguous()
        for name, kw_sd, kv in (("HND working sets", dict(kv_layout="HND"), (ws_k_hnd, ws_v_hnd)),
                                ("decode kernels (no tensor cores)", dict(use_tensor_cores=False), (ws_k, ws_v)),
                                ("FA2 backend", dict(backend="fa2"), (ws_k, ws_v)),
                                ("FA3 backend", dict(backend="fa3"), (ws_k, ws_v))):
            def alt(kw_sd=kw_sd, kv=kv):
                w = K.SparseDecode(DEV, **kw_sd)
                w.plan(K.page_table_indptr_host(seq, LAYOUT), ix, K.last_page_len_host(seq, LAYOUT), HQ, HKV, D, P,
                       BF16, BF16)
                ref = sd.run(q, ws_k, ws_v)
                got = w.run(q, *kv)
                err = (got.float() - ref.float()).abs().max().item()
                if err > 2e-2:
                    raise RuntimeError(f"differs from the NHD tensor-core result by {err}")
                return bench_ms(lambda: w.run(q, *kv))

            t = safe(r, "decode", f"sparse {name} b={b}", alt)
            if t is not None:
                res[f"sparse_{name.split()[0].lower()}_ms"] = t
                r.row("decode", f"SparseDecode, {name}, b={b}", 1e3 * t, "us",
                      f"{res['sparse_ms'] / t:.2f}x the runtime's (NHD, tensor cores)")
        del ws_k_hnd, ws_v_hnd

        # FlashInfer's XQA kernels (TensorRT-LLM's GQA decode) over a block table derived from the same
        # page table: no plan (first call compiles the kernel)
        def xqa():
            xd = K.XqaDecode(DEV, b, LAYOUT.slots)
            xd.fill(ip, ix, lp, P)
            ref = sd.run(q, ws_k, ws_v)
            got = xd.run(q, ws_k, ws_v)
            err = (got.float() - ref.float()).abs().max().item()
            if err > 2e-2:
                raise RuntimeError(f"differs from FlashInfer's paged decode by {err}")
            return bench_ms(lambda: xd.run(q, ws_k, ws_v)), graph_ms(lambda: xd.run(q, ws_k, ws_v))

        t = safe(r, "decode", f"sparse XQA b={b}", xqa)
        if t is not None:
            res["sparse_xqa_ms"], res["sparse_xqa_graph_ms"] = t
            r.row("decode", f"SparseDecode via XQA kernels, b={b}", 1e3 * t[0], "us",
                  f"{res['sparse_ms'] / t[0]:.2f}x the runtime's (NHD, tensor cores); {1e3 * t[1]:.1f} us in a graph")
        # the Triton split decode over the same page table (no plan): default chunk count and a sweep; with
        # fused=True each (request, KV head)'s last chunk merges the partial results (one launch, no merge kernel)
        ref = sd.run(q, ws_k, ws_v).float()
        locks = torch.zeros(b * HKV, dtype=torch.int32, device=DEV)

        def split_ms(n_split=None, pages_per_iter=1, fused=False, num_warps=4, num_stages=2, eager=True):
            locks.zero_()  # a failed configuration cannot leave counters behind for the next

            def run():
                return K.split_decode_attention(q, ws_k, ws_v, ip, ix, lp, max_slots=LAYOUT.slots, n_split=n_split,
                                                pages_per_iter=pages_per_iter, locks=locks if fused else None,
                                                num_warps=num_warps, num_stages=num_stages)
            err = (run().float() - ref).abs().max().item()
            if err > 2e-2:
                raise RuntimeError(f"differs from FlashInfer's paged decode by {err}")
            t = (bench_ms(run) if eager else None), graph_ms(run)
            err = (run().float() - ref).abs().max().item()  # after the graph's replays: counters re-armed
            if err > 2e-2 or locks.any():
                raise RuntimeError(f"after graph replays: error {err}, counters left {int(locks.count_nonzero())}")
            return t

        for n_split in (None, 2, 4, 8, 16):
            label = "default" if n_split is None else str(n_split)
            t = safe(r, "decode", f"sparse Triton split {label} b={b}", lambda n_split=n_split: split_ms(n_split))
            if t is not None:
                if n_split is None:
                    res["sparse_split_ms"], res["sparse_split_graph_ms"] = t
                r.row("decode", f"Triton split decode, {label} chunks per (request, KV head), b={b}", 1e3 * t[0], "us",
                      f"{1e3 * t[1]:.1f} us in a graph")
        t = safe(r, "decode", f"sparse Triton split fused b={b}", lambda: split_ms(fused=True))
        if t is not None:
            res["sparse_split_fused_ms"], res["sparse_split_fused_graph_ms"] = t
            r.row("decode", f"Triton split decode, merge fused, default chunks, b={b}", 1e3 * t[0], "us",
                  f"{1e3 * t[1]:.1f} us in a graph")
        if b == 8:  # launch shape of the split decode at the batch: chunks x slots per iteration x
            # merge kernel or fused merge (4 warps, 2 stages: the best of run J's 36-configuration sweep)
            sweep = []
            for n_split, ppi, fused in itertools.product((4, 8, 16), (1, 2), (False, True)):
                kw = dict(n_split=n_split, pages_per_iter=ppi, fused=fused)
                t = safe(r, "decode", f"sparse Triton split {kw}", lambda kw=kw: split_ms(**kw, eager=False)[1])
                if t is not None:
                    sweep.append(dict(kw, graph_ms=t))
            if sweep:
                sweep.sort(key=lambda x: x["graph_ms"])
                res["split_sweep"] = sweep
                res["sparse_split_best_graph_ms"] = sweep[0]["graph_ms"]
                for x in sweep[:4]:
                    r.row("decode", f"Triton split decode, {x['n_split']} chunks, {x['pages_per_iter']} slots/iter, "
                          f"{'fused merge' if x['fused'] else 'merge kernel'}, b={b}", 1e3 * x["graph_ms"], "us",
                          f"in a graph; {len(sweep)} configs swept, slowest {1e3 * sweep[-1]['graph_ms']:.1f} us")
        seq_dev, rows = seq.to(DEV), torch.arange(b, device=DEV)
        t = safe(r, "decode", "page table graph", lambda: graph_ms(lambda: K.build_page_table(
            seq_dev, rows, ip, ix, lp, layout=LAYOUT, slot_base=LAYOUT.slots)))
        res["page_table_graph_us"] = 1e3 * t if t is not None else float("nan")
        # dense FlashInfer paged decode over the full 32K context
        for ps in (1, 32):
            n_pages = b * ctx // ps
            kc = kv_k[: b * ctx].view(n_pages, ps, HKV, D)
            vc = kv_v[: b * ctx].view(n_pages, ps, HKV, D)
            dd = K.SparseDecode(DEV)
            indptr = (torch.arange(b + 1, dtype=torch.int32) * (ctx // ps))
            last = torch.full((b,), ps, dtype=torch.int32)

            def dense():
                dd.plan(indptr, torch.arange(n_pages, dtype=torch.int32, device=DEV), last, HQ, HKV, D, ps, BF16, BF16)
                return bench_ms(lambda: dd.run(q, kc, vc))

            t = safe(r, "decode", f"dense page {ps} b={b}", dense)
            res[f"dense_p{ps}_ms"] = float("nan") if t is None else t

        # Both again as a decode step runs them: captured in a CUDA graph (static metadata buffers,
        # planned outside the graph), so host-side launch work cannot show up as GPU time.
        def sparse_graph():
            w = K.SparseDecode(DEV, use_cuda_graph=True, batch_size=b, max_slots=LAYOUT.slots)
            w.kv_indices.copy_(ix)
            w.plan(K.page_table_indptr_host(seq, LAYOUT), w.kv_indices, K.last_page_len_host(seq, LAYOUT),
                   HQ, HKV, D, P, BF16, BF16)
            err = (w.run(q, ws_k, ws_v).float() - sd.run(q, ws_k, ws_v).float()).abs().max().item()
            if err > 2e-2:
                raise RuntimeError(f"differs from the eager wrapper by {err}")
            return graph_ms(lambda: w.run(q, ws_k, ws_v))

        t = safe(r, "decode", f"sparse graph b={b}", sparse_graph)
        res["sparse_graph_ms"] = float("nan") if t is None else t

        def dense_graph(ps=32):
            n_pages = b * ctx // ps
            w = K.SparseDecode(DEV, use_cuda_graph=True, batch_size=b, max_slots=ctx // ps)
            w.kv_indices.copy_(torch.arange(n_pages, dtype=torch.int32, device=DEV))
            w.plan(torch.arange(b + 1, dtype=torch.int32) * (ctx // ps), w.kv_indices,
                   torch.full((b,), ps, dtype=torch.int32), HQ, HKV, D, ps, BF16, BF16)
            kc = kv_k[: b * ctx].view(n_pages, ps, HKV, D)
            vc = kv_v[: b * ctx].view(n_pages, ps, HKV, D)
            return graph_ms(lambda: w.run(q, kc, vc))

        t = safe(r, "decode", f"dense graph b={b}", dense_graph)
        res["dense_p32_graph_ms"] = float("nan") if t is None else t
        out[f"b{b}"] = res
        r.row("decode", f"SparseDecode 2048-token working set, b={b}", 1e3 * res["sparse_ms"], "us",
              f"page table build {res['page_table_graph_us']:.1f} us (graph)")
        for ps in (1, 32):
            r.row("decode", f"dense FlashInfer decode 32K tokens, page {ps}, b={b}", 1e3 * res[f"dense_p{ps}_ms"], "us",
                  f"sparse is {res[f'dense_p{ps}_ms'] / res['sparse_ms']:.1f}x faster"
                  + (f", via XQA {res[f'dense_p{ps}_ms'] / res['sparse_xqa_ms']:.1f}x" if "sparse_xqa_ms" in res else ""))
        r.row("decode", f"in CUDA graphs: sparse {1e3 * res['sparse_graph_ms']:.1f} us, dense page 32 "
              f"{1e3 * res['dense_p32_graph_ms']:.1f} us, b={b}", res["dense_p32_graph_ms"] / res["sparse_graph_ms"], "x",
              "the speed-up a captured decode step sees")
        if "sparse_split_graph_ms" in res:
            r.row("decode", f"in CUDA graphs: Triton split decode {1e3 * res['sparse_split_graph_ms']:.1f} us, b={b}",
                  res["dense_p32_graph_ms"] / res["sparse_split_graph_ms"], "x", "speed-up over dense page 32 in a graph")
        if "sparse_split_fused_graph_ms" in res:
            r.row("decode", f"in CUDA graphs: Triton split decode, merge fused {1e3 * res['sparse_split_fused_graph_ms']:.1f}"
                  f" us, b={b}", res["dense_p32_graph_ms"] / res["sparse_split_fused_graph_ms"], "x",
                  "speed-up over dense page 32 in a graph")
        if "split_sweep" in res:
            x = res["split_sweep"][0]
            r.row("decode", f"in CUDA graphs: best Triton split decode {1e3 * x['graph_ms']:.1f} us ({x['n_split']} "
                  f"chunks, {x['pages_per_iter']} slots/iter, {'fused merge' if x['fused'] else 'merge kernel'}), "
                  f"b={b}",
                  res["dense_p32_graph_ms"] / x["graph_ms"], "x", "speed-up over dense page 32 in a graph")
        r.save()


def layers_graph_ms(fns, warmup=3, rep=20) -> float:
    """Per-layer GPU time of ``fns`` (one closure per layer, each over its own buffers), captured one
    after the other in one CUDA graph as a decode step runs its layers (L2 flushed before each replay)."""
    def step():
        for f in fns:
            f()
    return graph_ms(step, warmup=warmup, rep=rep) / len(fns)


def sec_step(r: Runner, out: dict, quick: bool):
    """Attention and selection as a captured decode step sees them: 8 layers (4 with ``quick``), each over
    its own KV / working sets / digests, in one CUDA graph; per-layer time = replay time / layers (the
    graph's launch is paid once per step, not once per layer)."""
    nl = 4 if quick else 8
    g = torch.Generator(device=DEV).manual_seed(5)
    ctx = 32768
    for b in ((1, 8) if quick else (1, 8, 32)):
        res = {"layers": nl}
        seq = torch.full((b,), ctx, dtype=torch.int32)
        ip = torch.empty(b + 1, dtype=torch.int32, device=DEV)
        ix = torch.empty(b * LAYOUT.slots, dtype=torch.int32, device=DEV)
        lp = torch.empty(b, dtype=torch.int32, device=DEV)
        K.build_page_table(seq.to(DEV), torch.arange(b, device=DEV), ip, ix, lp, layout=LAYOUT, slot_base=LAYOUT.slots)
        qs = [torch.randn((b, HQ, D), generator=g, device=DEV).to(BF16) for _ in range(nl)]
        ws = [(torch.randn((b * LAYOUT.slots, P, HKV, D), generator=g, device=DEV).to(BF16),
               torch.randn((b * LAYOUT.slots, P, HKV, D), generator=g, device=DEV).to(BF16)) for _ in range(nl)]
        def planned(tensor_cores: bool):
            w = K.SparseDecode(DEV, use_cuda_graph=True, batch_size=b, max_slots=LAYOUT.slots,
                               use_tensor_cores=tensor_cores)
            w.kv_indices.copy_(ix)
            w.plan(K.page_table_indptr_host(seq, LAYOUT), w.kv_indices, K.last_page_len_host(seq, LAYOUT),
                   HQ, HKV, D, P, BF16, BF16)
            return w

        sd = planned(True)
        ref = [sd.run(qs[i], *ws[i]).float() for i in range(nl)]
        # FlashInfer's decode kernels (CUDA cores) instead of its prefill kernels: SGLang's choice below GQA 4
        sdc = planned(False)
        locks = torch.zeros(b * HKV, dtype=torch.int32, device=DEV)

        def split(i, **kw):
            return K.split_decode_attention(qs[i], *ws[i], ip, ix, lp, max_slots=LAYOUT.slots, **kw)

        variants = {"flashinfer": lambda i: sd.run(qs[i], *ws[i]),
                    "flashinfer_cuda_cores": lambda i: sdc.run(qs[i], *ws[i]),
                    "triton_split": lambda i: split(i),
                    "triton_split_1slot": lambda i: split(i, pages_per_iter=1),
                    "triton_split_8x2": lambda i: split(i, n_split=8, pages_per_iter=2),
                    "triton_split_fused": lambda i: split(i, locks=locks)}
        for name, fn in variants.items():
            def run(fn=fn):
                for i in range(nl):
                    err = (fn(i).float() - ref[i]).abs().max().item()
                    if err > 2e-2:
                        raise RuntimeError(f"layer {i} differs from FlashInfer's paged decode by {err}")
                return layers_graph_ms([lambda i=i: fn(i) for i in range(nl)])
            t = safe(r, "step", f"sparse {name} b={b}", run)
            res[f"sparse_{name}_ms"] = float("nan") if t is None else t
        ws = None  # free the working sets before the dense caches
        # dense FlashInfer paged decode (page 32) over each layer's own 32K-token cache
        n_pages = b * ctx // 32
        dd = K.SparseDecode(DEV, use_cuda_graph=True, batch_size=b, max_slots=ctx // 32)
        dd.kv_indices.copy_(torch.arange(n_pages, dtype=torch.int32, device=DEV))
        dd.plan(torch.arange(b + 1, dtype=torch.int32) * (ctx // 32), dd.kv_indices,
                torch.full((b,), 32, dtype=torch.int32), HQ, HKV, D, 32, BF16, BF16)

        def dense():
            kv = [(torch.empty((n_pages, 32, HKV, D), dtype=BF16, device=DEV).normal_(generator=g),
                   torch.empty((n_pages, 32, HKV, D), dtype=BF16, device=DEV).normal_(generator=g)) for _ in range(nl)]
            return layers_graph_ms([lambda i=i: dd.run(qs[i], *kv[i]) for i in range(nl)])

        t = safe(r, "step", f"dense b={b}", dense)
        res["dense_p32_ms"] = float("nan") if t is None else t
        torch.cuda.empty_cache()
        out[f"decode_b{b}"] = res
        for name in variants:
            v = res[f"sparse_{name}_ms"]
            r.row("step", f"decode {name}, 2048-token working set, b={b}, per layer of {nl} in a graph", 1e3 * v, "us",
                  f"{res['dense_p32_ms'] / v:.2f}x dense 32K ({1e3 * res['dense_p32_ms']:.1f} us)")
        r.save()

    _step_select(r, out, quick, nl, g)


def _step_select(r: Runner, out: dict, quick: bool, nl: int, g: torch.Generator):
    """The fused scoring + top-k + residency update per layer of an ``nl``-layer graph: a 22-shape program
    sweep at batch 8, the best shape's two launches timed apart, the scoring alone, and a streaming read of
    the same digest bytes (:mod:`kernels.stream_read`, best of 8 grid shapes) as a measured floor beside the
    bytes-over-bandwidth one."""
    hbm = _ceil(r, "hbm_copy_gbps")
    for ctx in ((32768,) if quick else (32768, 131072)):
        for b in (1, 8):
            n_pages = ctx // P
            r2t = (P + torch.arange(b, device=DEV)[:, None] * ctx + torch.arange(ctx, device=DEV)).int()
            rows = torch.arange(b, device=DEV)
            n_ctx = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
            kw = dict(page_size=P, n_sink=LAYOUT.n_sink, n_window=LAYOUT.n_window)
            digs = [torch.randn((b * n_pages + 1, HKV, 2, D), generator=g, device=DEV).to(BF16) for _ in range(nl)]
            qs = [torch.randn((b, HQ, D), generator=g, device=DEV).to(BF16) for _ in range(nl)]
            resid = [torch.full((b, HKV, NSEL), -1, dtype=torch.long, device=DEV) for _ in range(nl)]
            rs = torch.empty((b, HKV, NSEL), dtype=torch.int32, device=DEV)
            rp = torch.empty_like(rs)
            sc = torch.empty((b, HKV, n_pages), device=DEV)
            n_cand = n_pages - LAYOUT.n_sink - LAYOUT.n_window
            dbytes = b * HKV * n_cand * 2 * D * 2
            ideal = 1e3 * dbytes / (hbm * 1e9) if hbm else float("nan")  # ms
            res = {"digest_bytes": dbytes, "ideal_ms": ideal, "layers": nl}
            if b >= 8:  # program shape: pages per block x warps x blocks per program (pipelined loop) x stages
                configs = [dict(block_n=bn, num_warps=nw, blocks_per_program=bpp, num_stages=st)
                           for bn in (32, 64) for nw in (2, 4) for bpp in (1, 2, 4) for st in ((2,) if bpp == 1 else (2, 3))]
                # (128-page blocks, half the keys to merge, were slower at 32K and 128K: run U, docs/BENCHMARKS.md)
                configs += [dict(block_n=64, num_warps=2, heads_fast=True), {}]
            else:
                configs = [{}, dict(block_n=64, num_warps=2), dict(block_n=64, num_warps=2, blocks_per_program=2,
                                                                  num_stages=3)]

            def cfg_name(cfg):
                if not cfg:
                    return "default"
                return (f"block{cfg['block_n']}_warps{cfg['num_warps']}" + ("_headsfast" if cfg.get("heads_fast") else "")
                        + (f"_bpp{cfg['blocks_per_program']}_st{cfg['num_stages']}"
                           if cfg.get("blocks_per_program", 1) > 1 else ""))

            def sel_fns(cfg):
                # "default" ({}): the shape score_and_select chooses itself, timed apart as that shape
                shape = cfg or K.score_select.launch_shape(b, HKV, n_pages, NSEL, sm_count(torch.device(DEV)))
                bn = shape["block_n"]
                keys = torch.empty(K.score_select.selection_scratch_size(b, HKV, n_pages, NSEL, bn), dtype=torch.int64,
                                   device=DEV)
                kb = max(16, 1 << (NSEL - 1).bit_length())
                common = dict(hkv=HKV, block_n=bn, kb=kb, page_size=P, n_sink=LAYOUT.n_sink, n_window=LAYOUT.n_window,
                              has_mask=False, max_pages=n_pages)

                def both(i):
                    K.score_and_select(qs[i], digs[i], r2t, rows, n_ctx, None, resid[i], NSEL, rs, rp,
                                       max_pages=n_pages, aggregation="mean", keys=keys, **cfg, **kw)

                def block(i):
                    K.score_select.score_block_topk(
                        qs[i], rows, digs[i], r2t, rows, n_ctx, keys, keys, aggregation="mean", q_by_row=False,
                        num_warps=shape.get("num_warps", 4), heads_fast=shape.get("heads_fast", False),
                        blocks_per_program=shape.get("blocks_per_program", 1), num_stages=shape.get("num_stages", 2),
                        **common)

                def merge(i, warps=None):
                    K.score_select.merge_select(keys, n_ctx, resid[i], rows, keys, rs, rp, None, k=NSEL, margin=0,
                                                num_warps=warps, **common)
                return both, block, merge

            for cfg in configs:
                both, _, _ = sel_fns(cfg)
                t = safe(r, "step", f"select {cfg_name(cfg)} ctx={ctx} b={b}", lambda: layers_graph_ms(
                    [lambda i=i: both(i) for i in range(nl)]))
                if t is not None:
                    res[f"select_{cfg_name(cfg)}_ms"] = t
            sel_keys = sorted((k_ for k_ in res if k_.startswith("select_") and k_.endswith("_ms")), key=res.get)
            if sel_keys:  # where the best configuration's time goes: the scoring launch, the merge launch
                best_cfg = next(c for c in configs if f"select_{cfg_name(c)}_ms" == sel_keys[0])
                both, block, merge = sel_fns(best_cfg)
                for i in range(nl):
                    both(i)  # keys and residency of a real selection for the merge to read
                t = safe(r, "step", f"block kernel ctx={ctx} b={b}", lambda: layers_graph_ms(
                    [lambda i=i: block(i) for i in range(nl)]))
                res["best_block_kernel_ms"] = float("nan") if t is None else t
                for w in (None, 4, 8, 16):
                    t = safe(r, "step", f"merge kernel warps {w} ctx={ctx} b={b}", lambda w=w: layers_graph_ms(
                        [lambda i=i: merge(i, w) for i in range(nl)]))
                    res[f"best_merge_kernel_w{w or 'default'}_ms"] = float("nan") if t is None else t
            for hf in (False, True):  # the scoring read alone (unfused, no top-k)
                t = safe(r, "step", f"score_pages hf={hf} ctx={ctx} b={b}", lambda hf=hf: layers_graph_ms(
                    [lambda i=i: K.score_pages(qs[i], digs[i], r2t, rows, n_ctx, None, sc, aggregation="mean",
                                               heads_fast=hf, **kw) for i in range(nl)]))
                if t is not None:
                    res[f"score_pages{'_headsfast' * hf}_ms"] = t
            # the floor: a streaming read of the same number of digest bytes (best of a few grid shapes)
            sms = sm_count(torch.device(DEV))
            floor_out = torch.empty(8 * sms, dtype=torch.float32, device=DEV)
            flats = [d_.view(-1)[: dbytes // 2] for d_ in digs]
            for mult in (1, 2, 4, 8):
                for blk, nw in ((2048, 4), (8192, 8)):
                    outs_ = floor_out[: mult * sms]
                    t = safe(r, "step", f"read floor grid={outs_.numel()} block={blk} ctx={ctx} b={b}",
                             lambda outs_=outs_, blk=blk, nw=nw: layers_graph_ms(
                                 [lambda i=i: K.stream_read.stream_sum(flats[i], outs_, block=blk, num_warps=nw)
                                  for i in range(nl)]))
                    if t is not None and t < res.get("read_floor_ms", float("inf")):
                        res["read_floor_ms"], res["read_floor_shape"] = t, f"{outs_.numel()} programs x {blk}"
            flats = None
            out[f"select_ctx{ctx}_b{b}"] = res
            tag = f"ctx={ctx // 1024}K b={b} ({dbytes / MIB:.1f} MiB digests), per layer of {nl}"
            for k_ in sel_keys[:3] + [k for k in ("select_default_ms",) if k in res and k not in sel_keys[:3]]:
                r.row("step", f"score_and_select {k_[7:-3]}, {tag}", 1e3 * res[k_], "us",
                      f"{res[k_] / ideal:.2f}x HBM ideal ({1e3 * ideal:.1f} us); {len(sel_keys)} configs")
            if "best_block_kernel_ms" in res:
                r.row("step", f"  of which scoring + block top-k launch, {tag}", 1e3 * res["best_block_kernel_ms"], "us",
                      "merge launch alone: " + ", ".join(
                          f"{w} warps {1e3 * res[f'best_merge_kernel_w{w}_ms']:.1f} us" for w in ("default", 4, 8, 16)))
            for k_ in ("score_pages_ms", "score_pages_headsfast_ms"):
                if k_ in res:
                    r.row("step", f"{k_[:-3]} (no top-k), {tag}", 1e3 * res[k_], "us", f"{res[k_] / ideal:.2f}x HBM ideal")
            if "read_floor_ms" in res:
                fl = res["read_floor_ms"]
                vs = (f"; default selection {res['select_default_ms'] / fl:.2f}x this floor"
                      if "select_default_ms" in res else "")
                r.row("step", f"read floor: streaming read of the digest bytes, {tag}", 1e3 * fl, "us",
                      f"{fl / ideal:.2f}x HBM ideal ({res['read_floor_shape']}){vs}")
            digs = None
            torch.cuda.empty_cache()
            r.save()



def sec_hostalloc(r: Runner, out: dict, quick: bool):
    """Start-up cost of the host tier: page-locking a large buffer with each allocator (the server pays
    it once; a 1 TB tier at 2 GB/s would take over 8 minutes)."""
    import os

    from freekv_sglang.runtime import host_store

    gib = 4 if quick else int(os.environ.get("FREEKV_BENCH_HOSTALLOC_GIB", "32"))
    page_bytes = 2 * HKV * P * D * 2  # K and V of one (page, layer), bf16
    n_pages = gib * 2**30 // (32 * page_bytes)
    old = os.environ.get(host_store.HOST_ALLOC_ENV)
    try:
        for how in ("parallel", "sglang", "parallel"):
            os.environ[host_store.HOST_ALLOC_ENV] = how
            t0 = time.perf_counter()
            st = host_store.HostKVStore(32, n_pages, HKV, P, D, BF16, pin=True)
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
            out.setdefault(how, []).append(dict(gib=st_gib(n_pages), seconds=sec, release_seconds=free_s, ok=ok))
            r.row("hostalloc", f"{how}: pin {st_gib(n_pages):.1f} GiB host tier", sec, "s",
                  f"{st_gib(n_pages) * 2**30 / sec / 1e9:.1f} GB/s; release {free_s:.1f} s; "
                  f"{'pinned, readable' if ok else 'NOT the allocator asked for or unreadable'}")
            r.save()
    finally:
        if old is None:
            os.environ.pop(host_store.HOST_ALLOC_ENV, None)
        else:
            os.environ[host_store.HOST_ALLOC_ENV] = old


def st_gib(n_pages: int) -> float:
    return 32 * n_pages * 2 * HKV * P * D * 2 / 2**30


SECTIONS = ("info", "ceilings", "recall", "overlap", "interfere", "offload", "scores", "decode", "step", "hostalloc")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write results here (rewritten after every section)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA device")
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in wanted:
        if s not in SECTIONS:
            sys.exit(f"unknown section {s!r}; choose from {SECTIONS}")
    t0 = time.time()
    r = Runner(args.json)
    sec_info_fn = {
        "info": (sec_info,), "ceilings": (sec_ceilings,), "recall": (sec_recall, args.quick), "overlap": (sec_overlap,),
        "interfere": (sec_interfere,), "offload": (sec_offload,), "scores": (sec_scores, args.quick), "decode": (sec_decode, args.quick),
        "step": (sec_step, args.quick), "hostalloc": (sec_hostalloc, args.quick),
    }
    if "ceilings" not in wanted and any(s in wanted for s in ("recall", "offload", "scores", "step")):
        wanted.insert(0, "ceilings")  # the ratios need the ceilings
    for s in SECTIONS:
        if s in wanted:
            fn, *extra = sec_info_fn[s]
            r.section(s, fn, *extra)
    r.results["total_seconds"] = round(time.time() - t0, 1)
    r.save()
    r.table()
    print(f"total {r.results['total_seconds']} s" + (f"; JSON: {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
