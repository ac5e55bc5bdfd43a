"""The selection's part of section ``step``: the fused scoring + top-k + residency update per layer of an
``nl``-layer CUDA graph, its program shapes, its two launches timed apart, the scoring alone, and a
streaming read of the same digest bytes as a measured floor."""

from __future__ import annotations

import torch

from .common import BF16, D, DEV, HKV, HQ, LAYOUT, MIB, NSEL, P, K, sm_count
from .timing import Runner, ceiling, layers_graph_ms, safe


def step_select(r: Runner, out: dict, quick: bool, nl: int, g: torch.Generator):
    """The fused scoring + top-k + residency update per layer of an ``nl``-layer graph: a 22-shape program
    sweep at batch 8, the best shape's two launches timed apart, the scoring alone, and a streaming read of
    the same digest bytes (:mod:`kernels.stream_read`, best of 8 grid shapes) as a measured floor beside the
    bytes-over-bandwidth one."""
    hbm = ceiling(r, "hbm_copy_gbps")
    for ctx in ((32768,) if quick else (32768, 131072)):
        for b in (1, 8):
            out[f"select_ctx{ctx}_b{b}"] = _select_case(r, SelectWork(ctx, b, nl, g), hbm)
            torch.cuda.empty_cache()
            r.save()


class SelectWork:
    """Per-layer digests, queries and residency of ``b`` requests of ``ctx`` tokens, and the selection's calls."""

    def __init__(self, ctx: int, b: int, nl: int, g: torch.Generator):
        self.ctx, self.b, self.nl = ctx, b, nl
        self.n_pages = n_pages = ctx // P
        self.r2t = (P + torch.arange(b, device=DEV)[:, None] * ctx + torch.arange(ctx, device=DEV)).int()
        self.rows = torch.arange(b, device=DEV)
        self.n_ctx = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
        self.kw = dict(page_size=P, n_sink=LAYOUT.n_sink, n_window=LAYOUT.n_window)
        self.digs = [torch.randn((b * n_pages + 1, HKV, 2, D), generator=g, device=DEV).to(BF16) for _ in range(nl)]
        self.qs = [torch.randn((b, HQ, D), generator=g, device=DEV).to(BF16) for _ in range(nl)]
        self.resid = [torch.full((b, HKV, NSEL), -1, dtype=torch.long, device=DEV) for _ in range(nl)]
        self.rs = torch.empty((b, HKV, NSEL), dtype=torch.int32, device=DEV)
        self.rp = torch.empty_like(self.rs)
        self.sc = torch.empty((b, HKV, n_pages), device=DEV)
        n_cand = n_pages - LAYOUT.n_sink - LAYOUT.n_window
        self.dbytes = b * HKV * n_cand * 2 * D * 2
        self.tag = f"ctx={ctx // 1024}K b={b} ({self.dbytes / MIB:.1f} MiB digests), per layer of {nl}"

    def per_layer_ms(self, fn) -> float:
        """``fn(i)`` of every layer ``i`` captured in one graph: replay time per layer."""
        return layers_graph_ms([lambda i=i: fn(i) for i in range(self.nl)])

    def fns(self, cfg: dict):
        """``(both, block, merge)`` per layer: ``score_and_select`` with program shape ``cfg``, and its two
        launches apart (the scoring + block top-k, the merge)."""
        b, n_pages, qs, digs, r2t, rows, n_ctx, resid = (self.b, self.n_pages, self.qs, self.digs, self.r2t,
                                                           self.rows, self.n_ctx, self.resid)
        # "default" ({}): the shape score_and_select chooses itself, timed apart as that shape
        shape = cfg or K.score_select.launch_shape(b, HKV, n_pages, NSEL, sm_count(torch.device(DEV)))
        bn = shape["block_n"]
        keys = torch.empty(K.score_select.selection_scratch_size(b, HKV, n_pages, NSEL, bn), dtype=torch.int64,
                           device=DEV)
        kb = max(16, 1 << (NSEL - 1).bit_length())
        common = dict(hkv=HKV, block_n=bn, kb=kb, page_size=P, n_sink=LAYOUT.n_sink, n_window=LAYOUT.n_window,
                      has_mask=False, max_pages=n_pages)

        def both(i):
            K.score_and_select(qs[i], digs[i], r2t, rows, n_ctx, None, resid[i], NSEL, self.rs, self.rp,
                               max_pages=n_pages, aggregation="mean", keys=keys, **cfg, **self.kw)

        def block(i):
            K.score_select.score_block_topk(
                qs[i], rows, digs[i], r2t, rows, n_ctx, keys, keys, aggregation="mean", q_by_row=False,
                num_warps=shape.get("num_warps", 4), heads_fast=shape.get("heads_fast", False),
                blocks_per_program=shape.get("blocks_per_program", 1), num_stages=shape.get("num_stages", 2),
                **common)

        def merge(i, warps=None):
            K.score_select.merge_select(keys, n_ctx, resid[i], rows, keys, self.rs, self.rp, None, k=NSEL, margin=0,
                                        num_warps=warps, **common)
        return both, block, merge


def select_configs(b: int) -> list[dict]:
    """Program shapes to time: pages per block x warps x blocks per program (pipelined loop) x stages at batch
    8 and above, a few at batch 1; ``{}`` is the shape ``score_and_select`` chooses."""
    if b >= 8:
        configs = [dict(block_n=bn, num_warps=nw, blocks_per_program=bpp, num_stages=st)
                   for bn in (32, 64) for nw in (2, 4) for bpp in (1, 2, 4) for st in ((2,) if bpp == 1 else (2, 3))]
        # (128-page blocks, half the keys to merge, were slower at 32K and 128K: docs/BENCHMARKS.md)
        return configs + [dict(block_n=64, num_warps=2, heads_fast=True), {}]
    return [{}, dict(block_n=64, num_warps=2), dict(block_n=64, num_warps=2, blocks_per_program=2, num_stages=3)]


def cfg_name(cfg: dict) -> str:
    if not cfg:
        return "default"
    return (f"block{cfg['block_n']}_warps{cfg['num_warps']}" + ("_headsfast" if cfg.get("heads_fast") else "")
            + (f"_bpp{cfg['blocks_per_program']}_st{cfg['num_stages']}"
               if cfg.get("blocks_per_program", 1) > 1 else ""))


def _select_case(r: Runner, w: SelectWork, hbm: float | None) -> dict:
    ideal = 1e3 * w.dbytes / (hbm * 1e9) if hbm else float("nan")  # ms
    res = {"digest_bytes": w.dbytes, "ideal_ms": ideal, "layers": w.nl}
    configs = select_configs(w.b)
    for cfg in configs:
        both, _, _ = w.fns(cfg)
        t = safe(r, "step", f"select {cfg_name(cfg)} ctx={w.ctx} b={w.b}", lambda: w.per_layer_ms(both))
        if t is not None:
            res[f"select_{cfg_name(cfg)}_ms"] = t
    sel_keys = sorted((k_ for k_ in res if k_.startswith("select_") and k_.endswith("_ms")), key=res.get)
    if sel_keys:  # where the best configuration's time goes: the scoring launch, the merge launch
        _time_launches(r, w, next(c for c in configs if f"select_{cfg_name(c)}_ms" == sel_keys[0]), res)
    for hf in (False, True):  # the scoring read alone (unfused, no top-k)
        t = safe(r, "step", f"score_pages hf={hf} ctx={w.ctx} b={w.b}", lambda hf=hf: w.per_layer_ms(
            lambda i: K.score_pages(w.qs[i], w.digs[i], w.r2t, w.rows, w.n_ctx, None, w.sc, aggregation="mean",
                                    heads_fast=hf, **w.kw)))
        if t is not None:
            res[f"score_pages{'_headsfast' * hf}_ms"] = t
    _read_floor(r, w, res)
    _select_rows(r, w.tag, res, sel_keys, ideal)
    return res


def _time_launches(r: Runner, w: SelectWork, best_cfg: dict, res: dict):
    """The best shape's scoring + block top-k launch and its merge launch (by warps), each alone."""
    both, block, merge = w.fns(best_cfg)
    for i in range(w.nl):
        both(i)  # keys and residency of a real selection for the merge to read
    t = safe(r, "step", f"block kernel ctx={w.ctx} b={w.b}", lambda: w.per_layer_ms(block))
    res["best_block_kernel_ms"] = float("nan") if t is None else t
    for warps in (None, 4, 8, 16):
        t = safe(r, "step", f"merge kernel warps {warps} ctx={w.ctx} b={w.b}", lambda warps=warps: w.per_layer_ms(
            lambda i: merge(i, warps)))
        res[f"best_merge_kernel_w{warps or 'default'}_ms"] = float("nan") if t is None else t


def _read_floor(r: Runner, w: SelectWork, res: dict):
    """The floor: a streaming read of the same number of digest bytes (best of a few grid shapes)."""
    sms = sm_count(torch.device(DEV))
    floor_out = torch.empty(8 * sms, dtype=torch.float32, device=DEV)
    flats = [d_.view(-1)[: w.dbytes // 2] for d_ in w.digs]
    for mult in (1, 2, 4, 8):
        for blk, nw in ((2048, 4), (8192, 8)):
            outs_ = floor_out[: mult * sms]
            t = safe(r, "step", f"read floor grid={outs_.numel()} block={blk} ctx={w.ctx} b={w.b}",
                     lambda outs_=outs_, blk=blk, nw=nw: w.per_layer_ms(
                         lambda i: K.stream_read.stream_sum(flats[i], outs_, block=blk, num_warps=nw)))
            if t is not None and t < res.get("read_floor_ms", float("inf")):
                res["read_floor_ms"], res["read_floor_shape"] = t, f"{outs_.numel()} programs x {blk}"


def _select_rows(r: Runner, tag: str, res: dict, sel_keys: list[str], ideal: float):
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
