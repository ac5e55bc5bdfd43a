"""GPU tests of every kernel against its torch reference (bf16 and fp16, GQA group sizes
1/3/4/7, head dims 64/128), with the host store really pinned. Run: ``pytest tests/gpu``.
Queries are standard normal, and 64 times that in the ``large_queries`` tests. The attention kernels
(FlashInfer, XQA, the Triton split decode) with large logits: tests/gpu/test_kernels_sparse_decode.py.
"""

from __future__ import annotations


import pytest
import torch


import freekv_sglang.kernels as K  # noqa: E402
from freekv_sglang.algorithm import WorkingSetLayout, page_digests  # noqa: E402
from freekv_sglang.algorithm.selection import topk_pages  # noqa: E402

DEV = torch.device("cuda")
DTYPES = (torch.bfloat16, torch.float16)
GROUPS = (1, 3, 4, 7)
HEAD_DIMS = (64, 128)


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, device=DEV).to(dtype)


def _pinned_randn(g, *shape, dtype):
    t = torch.empty(*shape, dtype=dtype, pin_memory=True)
    t.copy_(_randn(g, *shape, dtype=dtype).cpu())
    assert t.is_pinned()
    return t


def _pinned_nan(*shape, dtype):
    t = torch.empty(*shape, dtype=dtype, pin_memory=True)
    t.fill_(float("nan"))
    return t


def _same(a, b):
    return torch.equal(a.float().nan_to_num(1234.5), b.float().nan_to_num(1234.5))


# ------------------------------------------------------------------------------------ store
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("p,hkv,t", [(32, 8, 1000), (16, 3, 7), (256, 2, 600), (8, 1, 1)])
def test_store_kv_host(dtype, d, p, hkv, t):
    g = _gen(1)
    n_pages = (t + p - 1) // p + 3
    hq = 4 * hkv
    qkv = _randn(g, t, hq + 2 * hkv, d, dtype=dtype)
    k, v = qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    loc = torch.randperm(n_pages * p, device=DEV, generator=g)[:t]
    loc[1::5] = -1
    hk, hv = _pinned_nan(n_pages, hkv, p, d, dtype=dtype), _pinned_nan(n_pages, hkv, p, d, dtype=dtype)
    rk, rv = hk.clone(), hv.clone()
    K.store_kv_host(hk, hv, k, v, loc.int())
    torch.cuda.synchronize()  # the kernel writes host memory asynchronously
    K.store_kv_host_reference(rk, rv, k, v, loc)
    assert _same(hk, rk) and _same(hv, rv)
    assert int((~hk.isnan()).sum()) == int((loc >= 0).sum()) * hkv * d


def test_store_rejects_pageable_host():
    hk = torch.zeros(2, 1, 8, 64, dtype=torch.bfloat16)  # not pinned
    k = torch.zeros(1, 1, 64, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="pinned"):
        K.store_kv_host(hk, hk.clone(), k, k, torch.zeros(1, dtype=torch.int64, device=DEV))


# ---------------------------------------------------------------------------------- digests
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("p,hkv", [(32, 8), (16, 3), (256, 1), (8, 2)])
def test_page_digests(dtype, d, p, hkv):
    g = _gen(3)
    n_slots, m, n_host = 40, 30, 64
    ws = _randn(g, n_slots, p, hkv, d, dtype=dtype)
    src = ws.view(-1, hkv, d)
    row0 = torch.randperm(n_slots, device=DEV, generator=g)[:m] * p
    row0[::4] = -1
    dst = torch.randperm(n_host, device=DEV, generator=g)[:m]
    dig = torch.full((n_host, hkv, 2, d), float("nan"), dtype=dtype, device=DEV)
    ref = dig.clone()
    K.page_digests_from_rows(src, row0.int(), dst, dig, page_size=p)
    K.page_digests_from_rows_reference(src, row0, dst, ref, page_size=p)
    assert _same(dig, ref)
    # prefill form: fresh keys, whole pages
    keys = _randn(g, 7 * p + 3, hkv, d, dtype=dtype)
    dig2 = torch.empty(7, hkv, 2, d, dtype=dtype, device=DEV)
    K.page_digests_from_rows(keys, torch.arange(7, device=DEV) * p, torch.arange(7, device=DEV), dig2, page_size=p)
    assert torch.equal(dig2, page_digests(keys, p))


# ----------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("grp", GROUPS)
@pytest.mark.parametrize("agg", ["mean", "max", "softmax-mean"])
def test_score_pages(dtype, d, grp, agg):
    g = _gen(4)
    p, hkv, b, n_sink, n_window = 32, 4, 5, 4, 4
    max_ctx = 4096 + 96  # 131 pages: not a multiple of the page block
    n_host = 800
    keys = _randn(g, n_host * p, hkv, d, dtype=dtype)
    dig = page_digests(keys, p).contiguous()
    r2t = torch.randint(0, n_host * p, (b + 3, max_ctx), device=DEV, generator=g, dtype=torch.int32)
    rpi = torch.randperm(b + 3, device=DEV, generator=g)[:b]
    n_ctx = torch.tensor([max_ctx, 1, 700, 33 * 32 + 5, 4000], dtype=torch.int32, device=DEV)
    qkv = _randn(g, b, hkv * grp + 2 * hkv, d, dtype=dtype)
    q = qkv[:, : hkv * grp]
    hm = torch.rand(b, hkv, device=DEV, generator=g) < 0.6
    max_pages = max_ctx // p
    for mask in (None, hm):
        out = torch.full((b, hkv, max_pages), float("nan"), device=DEV)
        ref = out.clone()
        kw = dict(page_size=p, n_sink=n_sink, n_window=n_window, aggregation=agg)
        K.score_pages(q, dig, r2t, rpi, n_ctx, mask, out, heads_fast=grp in (3, 7), **kw)
        K.score_pages_reference(q, dig, r2t, rpi, n_ctx, mask, ref, **kw)
        assert not out.isnan().any()
        assert torch.equal(torch.isinf(out), torch.isinf(ref))
        fin = torch.isfinite(ref)
        assert fin.any()
        torch.testing.assert_close(out[fin], ref[fin], rtol=1e-5, atol=1e-5 * ref[fin].abs().max().item())
    # the same digests stored head-major ([Hkv, pages, 2, D] seen as [pages, Hkv, 2, D]): the same scores
    out_hm = torch.full_like(out, float("nan"))
    K.score_pages(q, dig.transpose(0, 1).contiguous().transpose(0, 1), r2t, rpi, n_ctx, hm, out_hm,
                  heads_fast=grp in (3, 7), **kw)
    assert torch.equal(out_hm, out)
    lay = WorkingSetLayout(p, n_sink, 8, n_window)
    assert torch.equal(torch.isfinite(out[:, 0]) | ~hm[:, :1], lay.candidate_mask(n_ctx.cpu(), max_pages).to(DEV)
                       | ~hm[:, :1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grp,d", [(4, 128), (7, 64)])
@pytest.mark.parametrize("agg", ["mean", "max"])
def test_score_pages_large_queries(dtype, grp, d, agg):
    """Queries 64 times standard normal (a trained model's outlier heads): page scores in the thousands,
    past what a float16 accumulation holds exactly; the kernel's float32 scores match the reference's to the
    same relative tolerance as standard-normal queries."""
    g = _gen(14)
    p, hkv, b, n_sink, n_window = 32, 4, 5, 4, 4
    max_ctx = 4096 + 96
    n_host = 800
    keys = _randn(g, n_host * p, hkv, d, dtype=dtype)
    dig = page_digests(keys, p).contiguous()
    r2t = torch.randint(0, n_host * p, (b + 3, max_ctx), device=DEV, generator=g, dtype=torch.int32)
    rpi = torch.randperm(b + 3, device=DEV, generator=g)[:b]
    n_ctx = torch.tensor([max_ctx, 1, 700, 33 * 32 + 5, 4000], dtype=torch.int32, device=DEV)
    q = (torch.randn(b, hkv * grp, d, generator=g, device=DEV) * 64.0).to(dtype)
    max_pages = max_ctx // p
    out = torch.full((b, hkv, max_pages), float("nan"), device=DEV)
    ref = out.clone()
    kw = dict(page_size=p, n_sink=n_sink, n_window=n_window, aggregation=agg)
    K.score_pages(q, dig, r2t, rpi, n_ctx, None, out, heads_fast=grp == 7, **kw)
    K.score_pages_reference(q, dig, r2t, rpi, n_ctx, None, ref, **kw)
    fin = torch.isfinite(ref)
    assert fin.any() and ref[fin].abs().max() > 1000
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and not out.isnan().any()
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-5, atol=1e-5 * ref[fin].abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim", [(1, 64), (4, 128), (7, 128)])
def test_prologue_large_queries(dtype, group, head_dim):
    """The decode prologue's correction check with queries 64 times standard normal (squared norms past the
    float16 range): the kernel matches its reference, and a query of nearly the previous direction is kept
    (tests/kernel_cases.py)."""
    from kernel_cases import LARGE_Q_SCALE, check_prologue

    check_prologue("cuda", dtype, group, head_dim, page=32, q_scale=LARGE_Q_SCALE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation,margin", [("mean", 0), ("max", 0), ("mean", 4)])
def test_score_select_large_queries(dtype, aggregation, margin):
    """Fused scoring + selection with queries 64 times standard normal: a top-k of the reference's scores and
    the same residency and recall lists (tests/kernel_cases.py)."""
    from kernel_cases import LARGE_Q_SCALE, check_score_select

    check_score_select("cuda", dtype, 4, 128, k=32, aggregation=aggregation, page=32, max_pages=1000, margin=margin,
                       q_scale=LARGE_Q_SCALE)


# ----------------------------------------------------------------------------------- select
@pytest.mark.parametrize("np_,k", [(1024, 32), (20, 32), (4096, 64), (300, 12)])
def test_select_and_diff(np_, k):
    g = _gen(5)
    b, hkv = 6, 8
    s0 = torch.randn(b, hkv, np_, device=DEV, generator=g)
    s1 = s0 + 0.3 * torch.randn(b, hkv, np_, device=DEV, generator=g)
    s1[torch.rand(s1.shape, device=DEV, generator=g) < 0.2] = float("-inf")
    s1[0, 3] = float("-inf")
    res = topk_pages(s0, k)[..., torch.randperm(k, device=DEV, generator=g)]
    res[1, 2, :5] = -1
    hm = torch.rand(b, hkv, device=DEV, generator=g) < 0.5
    for mask in (None, hm):
        a = K.select_and_diff(s1, res, mask, k)
        r = K.select_and_diff_reference(s1, res, mask, k)
        for x, y in zip(a, r):
            assert torch.equal(x, y)
    res32 = res.int().clone()
    a = K.select_and_diff(s1, res32, hm, k, resident_out=res32)
    assert a.resident is res32 and torch.equal(res32.long(), K.select_and_diff_reference(s1, res, hm, k).resident)


# ----------------------------------------------------------------------------------- recall
def _recall_problem(g, dtype, p, hkv, d, n_pieces, frac_valid=0.7):
    n_pages, n_slots = 200, 120
    hk = _pinned_randn(g, n_pages, hkv, p, d, dtype=dtype)
    hv = _pinned_randn(g, n_pages, hkv, p, d, dtype=dtype)
    n_pieces = min(n_pieces, n_slots * hkv)
    pairs = torch.randperm(n_slots * hkv, device=DEV, generator=g)[:n_pieces]
    slot, head = pairs // hkv, pairs % hkv
    page = torch.randint(0, n_pages, (n_pieces,), device=DEV, generator=g)
    slot = torch.where(torch.rand(n_pieces, device=DEV, generator=g) < frac_valid, slot, -1)
    return hk, hv, n_slots, page.int(), slot.int(), head.int()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("p,hkv", [(32, 8), (16, 3), (256, 2), (8, 1)])
@pytest.mark.parametrize("method", ["recall_gather", "recall_staged", "recall_per_page"])
def test_recall(dtype, d, p, hkv, method):
    g = _gen(6)
    hk, hv, n_slots, page, slot, head = _recall_problem(g, dtype, p, hkv, d, 300)
    wk = torch.full((n_slots, p, hkv, d), float("nan"), dtype=dtype, device=DEV)
    wv = wk.clone()
    rk, rv = wk.clone(), wv.clone()
    kw = {"chunk": 64} if method == "recall_staged" else {}
    getattr(K, method)(hk, hv, wk, wv, page, slot, head, **kw)
    K.recall_reference(hk, hv, rk, rv, page, slot, head)
    torch.cuda.synchronize()
    assert _same(wk, rk) and _same(wv, rv)
    assert int((~wk.isnan()).sum()) == int((slot >= 0).sum()) * p * d


@pytest.mark.parametrize("nprog", [1, 7, 64, 100000])
def test_recall_gather_grid_sizes(nprog):
    g = _gen(7)
    hk, hv, n_slots, page, slot, head = _recall_problem(g, torch.bfloat16, 32, 8, 128, 900)
    wk = torch.full((n_slots, 32, 8, 128), float("nan"), dtype=torch.bfloat16, device=DEV)
    wv = wk.clone()
    rk, rv = wk.clone(), wv.clone()
    K.recall_gather(hk, hv, wk, wv, page, slot, head, num_programs=nprog)
    K.recall_reference(hk, hv, rk, rv, page, slot, head)
    assert _same(wk, rk) and _same(wv, rv)


@pytest.mark.parametrize("method", ["recall_gather", "recall_selected"])
def test_recall_gpu_tier_behind_a_large_host_tier(method):
    """A host tier past 2**31 elements (4 GiB pinned, as every real one is): GPU-tier pages are still
    read from the right place (their element offset once wrapped at int32 and crashed a server)."""
    g = _gen(9)
    p, hkv, d, dtype = 32, 8, 128, torch.bfloat16
    n_host = 2**31 // (hkv * p * d) + 2
    host = torch.empty((n_host, hkv, p, d), dtype=dtype, pin_memory=True)  # K and V share it
    used = torch.tensor([0, 1, n_host - 2, n_host - 1])
    host[used] = _randn(g, 4, hkv, p, d, dtype=dtype).cpu()
    gk, gv = _randn(g, 4, hkv, p, d, dtype=dtype), _randn(g, 4, hkv, p, d, dtype=dtype)
    pages = torch.cat([used, n_host + torch.arange(4)]).to(DEV)  # 4 host pages, then the 4 GPU-tier pages
    n = pages.numel()
    if method == "recall_gather":
        slot, head = torch.arange(n, device=DEV), torch.arange(n, device=DEV) % hkv
        ws = [torch.full((n, p, hkv, d), float("nan"), dtype=dtype, device=DEV) for _ in range(4)]
        K.recall_gather(host, host, ws[0], ws[1], pages, slot, head, gpu_k=gk, gpu_v=gv)
        K.recall_reference(host, host, ws[2], ws[3], pages, slot, head, gk, gv)
    else:
        r2t = (pages[:, None] * p + torch.arange(p, device=DEV)).reshape(1, n * p).int()
        rows = torch.zeros(1, dtype=torch.long, device=DEV)
        recall_page = torch.stack([torch.randperm(n, device=DEV, generator=g) for _ in range(hkv)])[None]
        recall_slot = torch.arange(n, device=DEV).expand(1, hkv, n).contiguous()
        ws = [torch.full((n + 1, p, hkv, d), float("nan"), dtype=dtype, device=DEV) for _ in range(4)]
        for impl, (wk, wv) in (("triton", ws[:2]), ("torch", ws[2:])):
            K.recall_selected(host, host, wk, wv, recall_slot, recall_page, r2t, rows, page_size=p, slot_base=n + 1,
                              select_slot0=1, gpu_k=gk, gpu_v=gv, impl=impl)
    torch.cuda.synchronize()
    assert int((~ws[2].isnan()).sum()) == n * p * d * (hkv if method == "recall_selected" else 1)
    assert _same(ws[0], ws[2]) and _same(ws[1], ws[3])


def test_recall_selected_pieces_gpu():
    g = _gen(9)
    b, hkv, k, p, max_ctx = 4, 8, 32, 32, 8192
    r2t = torch.randint(0, 10**6, (6, max_ctx), device=DEV, generator=g, dtype=torch.int32)
    rpi = torch.tensor([5, 0, 2, 1], device=DEV)
    s = torch.randn(b, hkv, max_ctx // p, device=DEV, generator=g)
    res = topk_pages(torch.randn(b, hkv, max_ctx // p, device=DEV, generator=g), k)
    upd = K.select_and_diff(s, res, None, k)
    kw = dict(page_size=p, slot_base=80, select_slot0=16)
    got = K.recall_selected_pieces(upd.recall_slot, upd.recall_page, r2t, rpi, **kw)
    exp = K.recall_selected_pieces(upd.recall_slot.cpu(), upd.recall_page.cpu(), r2t.cpu(), rpi.cpu(), **kw)
    for x, y in zip(got, exp):
        assert x.is_cuda and torch.equal(x.cpu(), y)


# ------------------------------------------------------------------------------- page table
@pytest.mark.parametrize("lay", [WorkingSetLayout(32, 16, 32, 16), WorkingSetLayout(8, 3, 4, 3),
                                 WorkingSetLayout(16, 0, 2, 2), WorkingSetLayout(256, 1, 4, 2)])
def test_build_page_table(lay):
    g = torch.Generator().manual_seed(10)
    p = lay.page_size
    seq = torch.cat([torch.tensor([1, p, p + 1, lay.slots * p, lay.slots * p + 1]),
                     torch.randint(1, 200 * p, (59,), generator=g)]).int()
    b = len(seq)
    rpi = torch.randperm(b + 5, generator=g)[:b]
    outs = []
    for dev in (DEV, torch.device("cpu")):
        ip = torch.full((b + 1,), -9, dtype=torch.int32, device=dev)
        ix = torch.full((b * lay.slots + 3,), -9, dtype=torch.int32, device=dev)
        lp = torch.full((b,), -9, dtype=torch.int32, device=dev)
        K.build_page_table(seq.to(dev), rpi.to(dev), ip, ix, lp, layout=lay, slot_base=lay.slots + 1)
        outs.append((ip.cpu(), ix.cpu(), lp.cpu()))
    for x, y in zip(*outs):
        assert torch.equal(x, y)
    assert torch.equal(outs[0][0], K.page_table_indptr_host(seq, lay))
    assert torch.equal(outs[0][2], K.last_page_len_host(seq, lay))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,d", [(9, 64), (32, 128), (28, 128)])
def test_synthetic_query_mix(dtype, hq, d):
    """The benchmark's synthetic queries (one launch) against the torch expression."""
    from freekv_sglang.kernels.synthetic_query import mix_queries, mix_queries_reference

    g = torch.Generator(device="cuda").manual_seed(5)
    q = (torch.randn(6, hq, d, generator=g, device="cuda") * 3).to(dtype)
    u = torch.randn(64, hq, d, generator=g, device="cuda")
    rows = torch.tensor([0, 70, 2, 130, 1, 9], device="cuda")
    got = mix_queries(q, u, rows, 0.23)
    torch.testing.assert_close(got.float(), mix_queries_reference(q, u, rows, 0.23).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,grid,block", [(3 * 2**20 + 17, 264, 4096), (2**20, 132, 8192), (1000, 528, 2048)])
def test_stream_sum(dtype, n, grid, block):
    """The benchmark's digest-read floor: every element read once, per-program sums as the reference's."""
    from freekv_sglang.kernels.stream_read import stream_sum, stream_sum_reference

    x = (torch.randn(n, generator=_gen(41), device=DEV) + 0.5).to(dtype)
    out = torch.full((grid,), float("nan"), device=DEV)
    stream_sum(x, out, block=block)
    torch.testing.assert_close(out, stream_sum_reference(x, grid, block), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(out.sum(), x.float().sum(), rtol=1e-4, atol=1.0)
