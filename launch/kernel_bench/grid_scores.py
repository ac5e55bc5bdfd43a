"""Section ``grid``: page scoring with 2-bit grid codes (``score_pages_grid``, the ``grid2`` rule) against Quest
(``score_pages``) at the Llama-3.1-8B shape, one layer, 32K context x batch 8: both in a CUDA graph, GQA mean,
the ratio grid / Quest, each against reading its digests at the measured HBM speed (Quest: ``2 D`` bf16 per
page and KV head, grid: ``P D / 4`` bytes, 2x), the grid's products in int8 (its default at this head dim)
and in bf16 side by side; the runtime's fused scoring + top-k + residency
(``score_and_select``) with either; a sweep of the grid kernel's launch shape (not with ``--quick``); and
writing the codes vs the Quest digests of a 32K-token prefill layer and of 8 completed pages (decode)."""

from __future__ import annotations

import torch

from .common import BF16, D, DEV, HKV, HQ, LAYOUT, MIB, NSEL, P, K
from .timing import Runner, ceiling, graph_ms, safe_or_nan

#: the grid kernel's launch shapes swept (pages per program, warps, pipeline stages)
GRID_SHAPES = [(bn, nw, st) for bn in (32, 64, 128) for nw in (4, 8) for st in (2, 3)]
#: the fused selection's scoring shapes swept with grid codes (pages per block, warps, blocks per program, stages)
FUSED_SHAPES = [(64, 2, 2, 3), (64, 4, 1, 2), (64, 4, 2, 3), (128, 4, 1, 2), (128, 8, 1, 2), (256, 8, 1, 2)]


def sec_grid_scores(r: Runner, out: dict, quick: bool):
    from freekv_sglang.kernels import grid_codes as gc

    hbm = ceiling(r, "hbm_copy_gbps")
    for ctx, b in ((32768, 8),):
        out[f"ctx{ctx}_b{b}"] = _grid_case(r, gc, ctx, b, hbm, sweep=not quick)
        r.save()
    out["pack"] = _pack_case(r, gc, 32768)


def _grid_case(r: Runner, gc, ctx: int, b: int, hbm: float | None, sweep: bool) -> dict:
    n_pages = ctx // P
    g = torch.Generator(device=DEV).manual_seed(ctx + b)
    n_host = b * n_pages + 1
    dig = torch.randn((n_host, HKV, 2, D), generator=g, device=DEV).to(BF16)
    codes = torch.randint(0, 256, (n_host, HKV, P, D // 4), generator=g, device=DEV, dtype=torch.uint8)
    lo = -2.0 + 0.5 * torch.randn((b, HKV, D), generator=g, device=DEV)  # one grid per request
    step = 0.4 + 1.2 * torch.rand((b, HKV, D), generator=g, device=DEV)
    r2t = (P + torch.arange(b, device=DEV)[:, None] * ctx + torch.arange(ctx, device=DEV)).int()
    rpi = torch.arange(b, device=DEV)
    n_ctx = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
    q = torch.randn((b, HQ, D), generator=g, device=DEV).to(BF16)
    sq = torch.empty((b, HKV, n_pages), device=DEV)
    sg = torch.empty_like(sq)
    kw = dict(page_size=P, n_sink=LAYOUT.n_sink, n_window=LAYOUT.n_window, aggregation="mean")

    def quest():
        K.score_pages(q, dig, r2t, rpi, n_ctx, None, sq, **kw)

    def grid(**shape):
        gc.score_pages_grid(q, codes, lo, step, r2t, rpi, n_ctx, None, sg, **kw, **shape)

    def m(what, fn):
        return safe_or_nan(r, "grid", f"{what} ctx={ctx} b={b}", fn)

    n_cand = n_pages - LAYOUT.n_sink - LAYOUT.n_window
    res = {"quest_bytes": b * HKV * n_cand * 2 * D * 2, "grid_bytes": b * HKV * n_cand * P * D // 4}
    res["quest_ideal_ms"] = res["quest_bytes"] / (hbm * 1e9) * 1e3 if hbm else None
    res["grid_ideal_ms"] = res["grid_bytes"] / (hbm * 1e9) * 1e3 if hbm else None
    res["quest_graph_ms"] = m("quest graph", lambda: graph_ms(quest))
    res["grid_graph_ms"] = m("grid graph", lambda: graph_ms(grid))
    res["grid_bf16_graph_ms"] = m("grid bf16 products graph", lambda: graph_ms(lambda: grid(int8=False)))
    res["grid_one_grid_graph_ms"] = m("grid (one grid for all requests) graph", lambda: graph_ms(
        lambda: gc.score_pages_grid(q, codes, lo[:1], step[:1], r2t, rpi, n_ctx, None, sg, **kw)))
    tag = f"ctx={ctx // 1024}K b={b}"
    qt, gt = res["quest_graph_ms"], res["grid_graph_ms"]
    res["ratio"] = gt / qt
    r.row("grid", f"Quest score_pages mean, graph  {tag} ({res['quest_bytes'] / MIB:.0f} MiB)", 1e3 * qt, "us",
          f"{qt / res['quest_ideal_ms']:.2f}x HBM ideal" if hbm else "")
    r.row("grid", f"grid2 score_pages_grid mean, graph  {tag} ({res['grid_bytes'] / MIB:.0f} MiB)", 1e3 * gt, "us",
          f"{gt / res['grid_ideal_ms']:.2f}x HBM ideal" if hbm else "")
    r.row("grid", f"grid2 / Quest scoring time  {tag}", res["ratio"], "x")
    r.row("grid", f"grid2 with bf16 products (int8 off), graph  {tag}", 1e3 * res["grid_bf16_graph_ms"], "us",
          f"int8 products {res['grid_bf16_graph_ms'] / gt:.2f}x faster")
    r.row("grid", f"grid2, one grid for all requests, graph  {tag}", 1e3 * res["grid_one_grid_graph_ms"], "us")
    # the runtime's path: fused scoring + top-k + residency (score_and_select), Quest vs grid codes
    rows = torch.arange(b, device=DEV)
    rs = torch.empty((b, HKV, NSEL), dtype=torch.int32, device=DEV)
    rp = torch.empty_like(rs)
    res_q = torch.full((b, HKV, NSEL), -1, dtype=torch.long, device=DEV)
    res_g = res_q.clone()
    fkw = dict(max_pages=n_pages, **kw)
    res["quest_fused_graph_ms"] = m("quest fused graph", lambda: graph_ms(
        lambda: K.score_and_select(q, dig, r2t, rows, n_ctx, None, res_q, NSEL, rs, rp, **fkw)))
    res["grid_fused_graph_ms"] = m("grid fused graph", lambda: graph_ms(
        lambda: K.score_and_select(q, codes, r2t, rows, n_ctx, None, res_g, NSEL, rs, rp, grid=(lo, step), **fkw)))
    res["grid_fused_bf16_graph_ms"] = m("grid fused bf16 products graph", lambda: graph_ms(
        lambda: K.score_and_select(q, codes, r2t, rows, n_ctx, None, res_g, NSEL, rs, rp, grid=(lo, step),
                                   int8=False, **fkw)))
    qf, gf = res["quest_fused_graph_ms"], res["grid_fused_graph_ms"]
    res["fused_ratio"] = gf / qf
    r.row("grid", f"score_and_select (fused) with grid2, graph  {tag}", 1e3 * gf, "us",
          f"{res['fused_ratio']:.2f}x Quest's {1e3 * qf:.1f} us")
    r.row("grid", f"score_and_select with grid2, bf16 products, graph  {tag}", 1e3 * res["grid_fused_bf16_graph_ms"],
          "us", f"{res['grid_fused_bf16_graph_ms'] / qf:.2f}x Quest's")
    if sweep:  # the fused path's scoring program with grid codes (its default shape is tuned for Quest)
        fused = {}
        for bn, nw, bpp, st in FUSED_SHAPES:
            t = m(f"grid fused block {bn} warps {nw} x{bpp} stages {st}", lambda bn=bn, nw=nw, bpp=bpp, st=st: graph_ms(
                lambda: K.score_and_select(q, codes, r2t, rows, n_ctx, None, res_g, NSEL, rs, rp, grid=(lo, step),
                                           block_n=bn, num_warps=nw, blocks_per_program=bpp, num_stages=st, **fkw)))
            if t == t:
                fused[f"block{bn}_warps{nw}_x{bpp}_stages{st}"] = t
        if fused:
            best = min(fused, key=fused.get)
            res["grid_fused_sweep_ms"] = fused
            r.row("grid", f"score_and_select with grid2, best of {len(fused)} shapes ({best}), graph  {tag}",
                  1e3 * fused[best], "us", f"{fused[best] / qf:.2f}x Quest's fused")
    if sweep:
        times = {}
        for bn, nw, st in GRID_SHAPES:
            t = m(f"grid block {bn} warps {nw} stages {st}",
                  lambda bn=bn, nw=nw, st=st: graph_ms(lambda: grid(block_n=bn, num_warps=nw, num_stages=st)))
            if t == t:  # not nan
                times[f"block{bn}_warps{nw}_stages{st}"] = t
        if times:
            best = min(times, key=times.get)
            res["grid_sweep_ms"] = times
            res["best_ratio"] = times[best] / qt
            r.row("grid", f"grid2 best of {len(times)} shapes ({best}), graph  {tag}", 1e3 * times[best], "us",
                  f"{res['best_ratio']:.2f}x Quest" + (f", {times[best] / res['grid_ideal_ms']:.2f}x HBM ideal"
                                                      if hbm else ""))
    return res


def _pack_case(r: Runner, gc, ctx: int) -> dict:
    """Codes vs Quest digests written for a prefill layer of ``ctx`` tokens and for 8 completed pages (decode)."""
    g = torch.Generator(device=DEV).manual_seed(1)
    n_pages = ctx // P
    keys = torch.randn((ctx, HKV, D), generator=g, device=DEV).to(BF16)
    lo = -2.0 + 0.5 * torch.randn((1, HKV, D), generator=g, device=DEV)
    step = 0.4 + 1.2 * torch.rand((1, HKV, D), generator=g, device=DEV)
    codes = torch.empty((n_pages + 1, HKV, P, D // 4), dtype=torch.uint8, device=DEV)
    dig = torch.empty((n_pages + 1, HKV, 2, D), dtype=BF16, device=DEV)
    res = {}
    for tag, m in (("prefill", n_pages), ("decode", 8)):
        row0 = (torch.arange(m, device=DEV) * P).int()
        dst = torch.arange(1, m + 1, device=DEV)
        res[f"{tag}_codes_graph_ms"] = safe_or_nan(r, "grid", f"pack {tag}", lambda: graph_ms(
            lambda: gc.pack_grid_codes(keys, row0, dst, codes, lo, step, page_size=P)))
        res[f"{tag}_digests_graph_ms"] = safe_or_nan(r, "grid", f"digests {tag}", lambda: graph_ms(
            lambda: K.page_digests_from_rows(keys, row0, dst, dig, page_size=P)))
        r.row("grid", f"pack_grid_codes / Quest digests, {m} pages (graph)",
              1e3 * res[f"{tag}_codes_graph_ms"], "us", f"Quest digests {1e3 * res[f'{tag}_digests_graph_ms']:.1f} us")
    return res
