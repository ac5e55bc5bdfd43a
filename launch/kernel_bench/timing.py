"""Timers (``do_bench`` medians, wall clock, CUDA-graph replay, events on side streams) and the
:class:`Runner` that prints each row, keeps the table and rewrites the JSON file."""

from __future__ import annotations

import json
import os
import statistics
import time
import traceback

import torch


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def ratio_note(value: float, ceiling: float | None, what: str) -> str:
    """``"0.85x H2D"``: ``value`` as a multiple of ``ceiling``; empty without a ceiling."""
    return f"{value / ceiling:.2f}x {what}" if ceiling else ""


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


def layers_graph_ms(fns, warmup=3, rep=20) -> float:
    """Per-layer GPU time of ``fns`` (one closure per layer, each over its own buffers), captured one
    after the other in one CUDA graph as a decode step runs its layers (L2 flushed before each replay)."""
    def step():
        for f in fns:
            f()
    return graph_ms(step, warmup=warmup, rep=rep) / len(fns)


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


def ceiling(r: Runner, key: str) -> float | None:
    """A ceiling the ``ceilings`` section measured (``h2d_gbps``, ``d2h_gbps``, ``hbm_copy_gbps``), or None."""
    return r.state.get(key)


def safe(r: Runner, section: str, what: str, fn):
    """Run one measurement; on error record it and return None (the section goes on)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        r.row(section, f"{what}: ERROR", f"{type(e).__name__}: {str(e)[:80]}")
        return None


def safe_or_nan(r: Runner, section: str, what: str, fn) -> float:
    """:func:`safe`, with NaN in place of a failed measurement."""
    t = safe(r, section, what, fn)
    return float("nan") if t is None else t
