"""Section ``decode``: ``SparseDecode`` over a 2048-token working set (FlashInfer's paged decode, its
variants and the Triton split decode) vs FlashInfer dense paged decode over 32K tokens
(page size 1 and 32), batch 1/8/32, 32 q / 8 kv heads; eager and in CUDA graphs."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch

from .common import BF16, D, DEV, HKV, HQ, LAYOUT, P, K, page_table
from .timing import Runner, bench_ms, graph_ms, safe, safe_or_nan


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
        c = _decode_case(b, ctx, q, ws_k, ws_v, kv_k, kv_v)
        res = {}
        _flashinfer_splits(r, c, res)
        _flashinfer_variants(r, c, res)
        _triton_split(r, c, res)
        seq_dev, rows = c.seq.to(DEV), torch.arange(b, device=DEV)
        t = safe(r, "decode", "page table graph", lambda: graph_ms(lambda: K.build_page_table(
            seq_dev, rows, c.ip, c.ix, c.lp, layout=LAYOUT, slot_base=LAYOUT.slots)))
        res["page_table_graph_us"] = 1e3 * t if t is not None else float("nan")
        _dense(r, c, res)
        _in_graphs(r, c, res)
        out[f"b{b}"] = res
        _decode_rows(r, b, res)
        r.save()


def _decode_case(b, ctx, q, ws_k, ws_v, kv_k, kv_v) -> SimpleNamespace:
    """Batch ``b``: the working sets' page table (2048 tokens each) and FlashInfer's paged decode planned over it."""
    seq, ip, ix, lp = page_table(b, ctx)
    c = SimpleNamespace(b=b, ctx=ctx, q=q, ws_k=ws_k, ws_v=ws_v, kv_k=kv_k, kv_v=kv_v, seq=seq, ip=ip, ix=ix, lp=lp)
    c.sd = _planned(c)
    return c


def _planned(c: SimpleNamespace, plan_kw: dict | None = None, **wrapper_kw):
    """A FlashInfer paged decode (``wrapper_kw``) planned over the batch's working sets (``plan_kw``)."""
    w = K.SparseDecode(DEV, **wrapper_kw)
    w.plan(K.page_table_indptr_host(c.seq, LAYOUT), c.ix, K.last_page_len_host(c.seq, LAYOUT), HQ, HKV, D, P,
           BF16, BF16, **(plan_kw or {}))
    return w


def _flashinfer_splits(r: Runner, c: SimpleNamespace, res: dict):
    """The runtime's paged decode, and fixed KV splits (pages per program) against FlashInfer's own choice."""
    b, q, ws_k, ws_v, sd = c.b, c.q, c.ws_k, c.ws_v, c.sd
    res["sparse_ms"] = bench_ms(lambda: sd.run(q, ws_k, ws_v))
    for sp in (4, 8, 16):
        def split(sp=sp):
            w = _planned(c, dict(split_pages=sp))
            return bench_ms(lambda: w.run(q, ws_k, ws_v))

        _vs_runtime(r, res, f"sparse split {sp} pages b={b}", f"sparse_split{sp}_ms", split,
                    f"SparseDecode, KV split every {sp} pages, b={b}", "FlashInfer's own split")


def _vs_runtime(r: Runner, res: dict, what: str, key: str, fn, label: str, vs: str):
    """Time ``fn`` (guarded: ``what`` names it in an error row); keep it as ``res[key]`` and print row ``label``
    with its speed-up over the runtime's paged decode (``res["sparse_ms"]``)."""
    t = safe(r, "decode", what, fn)
    if t is not None:
        res[key] = t
        r.row("decode", label, 1e3 * t, "us", f"{res['sparse_ms'] / t:.2f}x {vs}")


def _flashinfer_variants(r: Runner, c: SimpleNamespace, res: dict):
    """The same attention with FlashInfer's other decode kernels."""
    b, q, ws_k, ws_v, sd = c.b, c.q, c.ws_k, c.ws_v, c.sd
    for name, kw_sd, kv in (("decode kernels (no tensor cores)", dict(use_tensor_cores=False), (ws_k, ws_v)),
                            ("FA2 backend", dict(backend="fa2"), (ws_k, ws_v)),
                            ("FA3 backend", dict(backend="fa3"), (ws_k, ws_v))):
        def alt(kw_sd=kw_sd, kv=kv):
            w = _planned(c, **kw_sd)
            ref = sd.run(q, ws_k, ws_v)
            got = w.run(q, *kv)
            err = (got.float() - ref.float()).abs().max().item()
            if err > 2e-2:
                raise RuntimeError(f"differs from the NHD tensor-core result by {err}")
            return bench_ms(lambda: w.run(q, *kv))

        _vs_runtime(r, res, f"sparse {name} b={b}", f"sparse_{name.split()[0].lower()}_ms", alt,
                    f"SparseDecode, {name}, b={b}", "the runtime's (NHD, tensor cores)")


def _split_timer(c: SimpleNamespace):
    """``split_ms(**shape) -> (eager ms or None, graph ms)`` of the Triton split decode over the same page table
    (no plan), checked against FlashInfer's paged decode before and after the graph's replays."""
    q, ws_k, ws_v, ip, ix, lp = c.q, c.ws_k, c.ws_v, c.ip, c.ix, c.lp
    ref = c.sd.run(q, ws_k, ws_v).float()

    def split_ms(n_split=None, pages_per_iter=1, num_warps=4, num_stages=2, eager=True):
        def run():
            return K.split_decode_attention(q, ws_k, ws_v, ip, ix, lp, max_slots=LAYOUT.slots, n_split=n_split,
                                            pages_per_iter=pages_per_iter, num_warps=num_warps, num_stages=num_stages)
        err = (run().float() - ref).abs().max().item()
        if err > 2e-2:
            raise RuntimeError(f"differs from FlashInfer's paged decode by {err}")
        t = (bench_ms(run) if eager else None), graph_ms(run)
        err = (run().float() - ref).abs().max().item()
        if err > 2e-2:
            raise RuntimeError(f"after graph replays: error {err}")
        return t
    return split_ms


def _triton_split(r: Runner, c: SimpleNamespace, res: dict):
    """The Triton split decode: default chunk count and a sweep, at batch 8 the launch shape."""
    b = c.b
    split_ms = _split_timer(c)
    for n_split in (None, 2, 4, 8, 16):
        label = "default" if n_split is None else str(n_split)
        t = safe(r, "decode", f"sparse Triton split {label} b={b}", lambda n_split=n_split: split_ms(n_split))
        if t is not None:
            if n_split is None:
                res["sparse_split_ms"], res["sparse_split_graph_ms"] = t
            r.row("decode", f"Triton split decode, {label} chunks per (request, KV head), b={b}", 1e3 * t[0], "us",
                  f"{1e3 * t[1]:.1f} us in a graph")
    if b == 8:
        _triton_split_shapes(r, b, split_ms, res)


def _triton_split_shapes(r: Runner, b: int, split_ms, res: dict):
    """Launch shape of the split decode at batch 8: chunks x slots per iteration (4 warps, 2 stages: the best
    of a 36-configuration sweep, docs/BENCHMARKS.md)."""
    sweep = []
    for n_split, ppi in itertools.product((4, 8, 16), (1, 2)):
        kw = dict(n_split=n_split, pages_per_iter=ppi)
        t = safe(r, "decode", f"sparse Triton split {kw}", lambda kw=kw: split_ms(**kw, eager=False)[1])
        if t is not None:
            sweep.append(dict(kw, graph_ms=t))
    if sweep:
        sweep.sort(key=lambda x: x["graph_ms"])
        res["split_sweep"] = sweep
        res["sparse_split_best_graph_ms"] = sweep[0]["graph_ms"]
        for x in sweep[:4]:
            r.row("decode", f"Triton split decode, {x['n_split']} chunks, {x['pages_per_iter']} slots/iter, b={b}",
                  1e3 * x["graph_ms"], "us",
                  f"in a graph; {len(sweep)} configs swept, slowest {1e3 * sweep[-1]['graph_ms']:.1f} us")


def _dense_cache(c: SimpleNamespace, ps: int):
    """The batch's dense KV cache (32K tokens a request) viewed as pages of ``ps`` tokens."""
    n_pages = c.b * c.ctx // ps
    return n_pages, c.kv_k[: c.b * c.ctx].view(n_pages, ps, HKV, D), c.kv_v[: c.b * c.ctx].view(n_pages, ps, HKV, D)


def _dense(r: Runner, c: SimpleNamespace, res: dict):
    """Dense FlashInfer paged decode over the full 32K context, pages of 1 and 32 tokens."""
    b, q = c.b, c.q
    for ps in (1, 32):
        n_pages, kc, vc = _dense_cache(c, ps)
        dd = K.SparseDecode(DEV)
        indptr = (torch.arange(b + 1, dtype=torch.int32) * (c.ctx // ps))
        last = torch.full((b,), ps, dtype=torch.int32)

        def dense():
            dd.plan(indptr, torch.arange(n_pages, dtype=torch.int32, device=DEV), last, HQ, HKV, D, ps, BF16, BF16)
            return bench_ms(lambda: dd.run(q, kc, vc))

        res[f"dense_p{ps}_ms"] = safe_or_nan(r, "decode", f"dense page {ps} b={b}", dense)


def _in_graphs(r: Runner, c: SimpleNamespace, res: dict):
    """Sparse and dense (page 32) again as a decode step runs them: captured in a CUDA graph (static metadata
    buffers, planned outside the graph), so host-side launch work cannot show up as GPU time."""
    b, q, ws_k, ws_v, seq = c.b, c.q, c.ws_k, c.ws_v, c.seq

    def sparse_graph():
        w = K.SparseDecode(DEV, use_cuda_graph=True, batch_size=b, max_slots=LAYOUT.slots)
        w.kv_indices.copy_(c.ix)
        w.plan(K.page_table_indptr_host(seq, LAYOUT), w.kv_indices, K.last_page_len_host(seq, LAYOUT),
               HQ, HKV, D, P, BF16, BF16)
        err = (w.run(q, ws_k, ws_v).float() - c.sd.run(q, ws_k, ws_v).float()).abs().max().item()
        if err > 2e-2:
            raise RuntimeError(f"differs from the eager wrapper by {err}")
        return graph_ms(lambda: w.run(q, ws_k, ws_v))

    res["sparse_graph_ms"] = safe_or_nan(r, "decode", f"sparse graph b={b}", sparse_graph)

    def dense_graph(ps=32):
        n_pages, kc, vc = _dense_cache(c, ps)
        w = K.SparseDecode(DEV, use_cuda_graph=True, batch_size=b, max_slots=c.ctx // ps)
        w.kv_indices.copy_(torch.arange(n_pages, dtype=torch.int32, device=DEV))
        w.plan(torch.arange(b + 1, dtype=torch.int32) * (c.ctx // ps), w.kv_indices,
               torch.full((b,), ps, dtype=torch.int32), HQ, HKV, D, ps, BF16, BF16)
        return graph_ms(lambda: w.run(q, kc, vc))

    res["dense_p32_graph_ms"] = safe_or_nan(r, "decode", f"dense graph b={b}", dense_graph)


def _decode_rows(r: Runner, b: int, res: dict):
    r.row("decode", f"SparseDecode 2048-token working set, b={b}", 1e3 * res["sparse_ms"], "us",
          f"page table build {res['page_table_graph_us']:.1f} us (graph)")
    for ps in (1, 32):
        r.row("decode", f"dense FlashInfer decode 32K tokens, page {ps}, b={b}", 1e3 * res[f"dense_p{ps}_ms"], "us",
              f"sparse is {res[f'dense_p{ps}_ms'] / res['sparse_ms']:.1f}x faster")
    dense_graph = res["dense_p32_graph_ms"]
    r.row("decode", f"in CUDA graphs: sparse {1e3 * res['sparse_graph_ms']:.1f} us, dense page 32 "
          f"{1e3 * dense_graph:.1f} us, b={b}", dense_graph / res["sparse_graph_ms"], "x",
          "the speed-up a captured decode step sees")
    if "sparse_split_graph_ms" in res:
        r.row("decode", f"in CUDA graphs: Triton split decode {1e3 * res['sparse_split_graph_ms']:.1f} us, b={b}",
              dense_graph / res["sparse_split_graph_ms"], "x", "speed-up over dense page 32 in a graph")
    if "split_sweep" in res:
        x = res["split_sweep"][0]
        r.row("decode", f"in CUDA graphs: best Triton split decode {1e3 * x['graph_ms']:.1f} us ({x['n_split']} "
              f"chunks, {x['pages_per_iter']} slots/iter), b={b}", dense_graph / x["graph_ms"], "x", "speed-up over dense page 32 in a graph")
