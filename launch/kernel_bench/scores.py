"""Section ``scores``: ``score_and_select`` (the runtime's fused scoring + top-k + residency) and the
unfused ``score_pages`` + ``select_and_diff`` at 32K / 128K contexts, batch 1/8, against reading the
digests at the measured HBM speed; at batch 8 a sweep of the fused path's program shape."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .common import BF16, D, DEV, HKV, HQ, LAYOUT, MIB, NSEL, P, K
from .timing import Runner, bench_ms, ceiling, graph_ms, safe_or_nan


def sec_scores(r: Runner, out: dict, quick: bool):
    hbm = ceiling(r, "hbm_copy_gbps")
    for ctx in ((32768,) if quick else (32768, 131072)):
        for b in (1, 8):
            out[f"ctx{ctx}_b{b}"] = _scores_case(r, ctx, b, hbm)
            r.save()


def _score_inputs(ctx: int, b: int) -> SimpleNamespace:
    """Digests, query, outputs and a residency of one (context, batch) case, with the timed unfused calls
    (closures over local tensors, as the eager timings include their Python cost)."""
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
    return SimpleNamespace(ctx=ctx, b=b, n_pages=n_pages, dig=dig, r2t=r2t, rpi=rpi, n_ctx=n_ctx, q=q, kw=kw,
                           resident=resident, score=score, select=select, select_ref=select_ref,
                           dbytes=b * HKV * n_cand * 2 * D * 2)


def _scores_case(r: Runner, ctx: int, b: int, hbm: float | None) -> dict:
    c = _score_inputs(ctx, b)
    res = {"digest_bytes": c.dbytes}
    res["ideal_ms"] = c.dbytes / (hbm * 1e9) * 1e3 if hbm else None

    def m(what, fn):
        return safe_or_nan(r, "scores", f"{what} ctx={ctx} b={b}", fn)

    score, select, select_ref = c.score, c.select, c.select_ref
    res["score_ms"] = m("score eager", lambda: bench_ms(score))
    res["score_graph_ms"] = m("score graph", lambda: graph_ms(score))
    res["score_softmax_graph_ms"] = m("softmax graph", lambda: graph_ms(lambda: score("softmax-mean")))
    res["score_select_graph_ms"] = m("score+select graph", lambda: graph_ms(lambda: (score(), select())))
    res["score_select_eager_ms"] = m("score+select eager", lambda: bench_ms(lambda: (score(), select())))
    res["select_graph_ms"] = m("select graph", lambda: graph_ms(select))
    res["select_torch_graph_ms"] = m("torch select graph", lambda: graph_ms(select_ref))
    res["select_torch_eager_ms"] = m("torch select eager", lambda: bench_ms(select_ref))
    fused = _fused_select(c)
    keys = torch.empty(K.score_select.selection_scratch_size(b, HKV, c.n_pages, NSEL), dtype=torch.int64,
                       device=DEV)
    res["fused_graph_ms"] = m("fused score+select graph", lambda: graph_ms(lambda: fused(keys)))
    tag = f"ctx={ctx // 1024}K b={b} ({c.dbytes / MIB:.1f} MiB digests)"
    _score_rows(r, res, tag)
    if b >= 8:  # tuning sweep of the fused path's scoring program (block pages x warps)
        _fused_sweep(r, c, fused, m, res, tag)
    return res


def _fused_select(c: SimpleNamespace):
    """``fused(keys, **shape)``: the fused scoring + selection of case ``c`` into its own residency copy."""
    res_f = c.resident.clone()
    rs = torch.empty((c.b, HKV, NSEL), dtype=torch.int32, device=DEV)
    rp = torch.empty_like(rs)

    def fused(keys, **shape):
        K.score_and_select(c.q, c.dig, c.r2t, c.rpi, c.n_ctx, None, res_f, NSEL, rs, rp, max_pages=c.n_pages,
                           aggregation="mean", keys=keys, **shape, **c.kw)
    return fused


def _score_rows(r: Runner, res: dict, tag: str):
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


def _fused_sweep(r: Runner, c: SimpleNamespace, fused, m, res: dict, tag: str):
    """The fused path's scoring program: pages per block x warps, in a graph."""
    sweep = {}
    for bn in (32, 64, 128, 256):
        if bn > max(32, 1 << (c.n_pages - 1).bit_length()):
            continue
        for nw in (2, 4, 8):
            kk = torch.empty(K.score_select.selection_scratch_size(c.b, HKV, c.n_pages, NSEL, bn),
                             dtype=torch.int64, device=DEV)

            def tuned(bn=bn, nw=nw, kk=kk):
                fused(kk, block_n=bn, num_warps=nw)

            t = m(f"fused block {bn} warps {nw}", lambda: graph_ms(tuned))
            if t == t:  # not nan
                sweep[f"block{bn}_warps{nw}"] = t
    if sweep:
        best = min(sweep, key=sweep.get)
        res["fused_sweep_ms"] = sweep
        ideal = res["ideal_ms"]
        r.row("scores", f"score_and_select best of {len(sweep)} configs ({best}), graph  {tag}",
              1e3 * sweep[best], "us", f"{sweep[best] / ideal:.2f}x HBM ideal" if ideal else "")
