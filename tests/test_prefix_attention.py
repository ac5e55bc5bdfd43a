"""Prefill with a cached prefix: the split (new tokens causal + prefix blocks, merged by log-sum-exp) equals
causal attention over prefix + new tokens; the runtime's staging of prefixes from the host tier feeds it
the right pages, in blocks that span requests, with requests without a prefix in between."""

from __future__ import annotations

import math

import pytest
import torch

from freekv_sglang.algorithm import WorkingSetLayout
from freekv_sglang.algorithm.extend import attention_lse, extend_attention, merge_lse
from freekv_sglang.runtime.engine import FreeKVRuntime, RuntimeSettings
from freekv_sglang.runtime.prefix import PrefixAttention, page_runs
from freekv_sglang.runtime.sizing import ModelShape


def _rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("qscale", [1.0, 40.0])  # large logits catch a missing max-subtraction
def test_split_and_merge_equals_causal_attention(qscale):
    g = torch.Generator().manual_seed(1)
    m, t, hq, hkv, d = 37, 11, 6, 2, 16
    q = _rand(g, t, hq, d, scale=qscale)
    kp, vp, kn, vn = (_rand(g, n, hkv, d) for n in (m, m, t, t))
    scale = d ** -0.5
    want = extend_attention(q, kn, vn, kp, vp, scale)
    # direct: causal over everything, row by row
    k, v = torch.cat([kp, kn]), torch.cat([vp, vn])
    for i in range(t):
        logits = torch.einsum("hgd,nhd->hgn", q[i].view(hkv, hq // hkv, d), k[: m + i + 1]) * scale
        direct = torch.einsum("hgn,nhd->hgd", logits.softmax(-1), v[: m + i + 1]).reshape(hq, d)
        torch.testing.assert_close(want[i], direct, atol=1e-5, rtol=1e-5)
    # split: own causal part, then the prefix in two blocks
    o, s = attention_lse(q, kn, vn, scale, causal=True)
    for a, b in ((0, 20), (20, m)):
        o, s = merge_lse(o, s, *attention_lse(q, kp[a:b], vp[a:b], scale))
    torch.testing.assert_close(o, want, atol=1e-5, rtol=1e-5)


def test_a_query_that_sees_nothing_merges_as_zero_weight():
    o0, s0 = torch.zeros(2, 3, 4), torch.full((2, 3), float("-inf"))
    o1, s1 = torch.randn(2, 3, 4), torch.randn(2, 3)
    o, s = merge_lse(o1, s1, o0, s0)
    torch.testing.assert_close(o, o1)
    torch.testing.assert_close(s, s1)


def _runtime(g, P=4, L=2, hkv=2, group=3, d=16, R=6, max_ctx=130, page_scoring="quest", n_sink=1,
             alloc="scattered", n_gpu_pages=0, dtype=torch.float32, kv_fp8=False, device="cpu"):
    """A CPU runtime whose rows own whole pages: ``scattered`` (a random permutation) or ``contiguous``
    (row after row, in order); with ``n_gpu_pages`` the last pages are the GPU tier's."""
    lay = WorkingSetLayout(page_size=P, n_sink=n_sink, n_select=3, n_window=2)
    shape = ModelShape(L, hkv * group, hkv, d, dtype)
    per_row = -(-max_ctx // P)
    n_pages = R * per_row + 1
    perm = torch.randperm(n_pages - 1, generator=g) + 1 if alloc == "scattered" else torch.arange(1, n_pages)
    r2t = torch.zeros((R + 1, max_ctx), dtype=torch.int32)
    for r in range(1, R + 1):
        pages = perm[(r - 1) * per_row: r * per_row]
        r2t[r] = (pages[:, None] * P + torch.arange(P)).flatten()[:max_ctx].int()
    return FreeKVRuntime(shape, RuntimeSettings(lay, page_scoring=page_scoring, kv_fp8=kv_fp8), n_pages - n_gpu_pages,
                         R, r2t.to(device), max_batch=8, device=device, n_gpu_pages=n_gpu_pages)


def _check_staged_prefix_attention(rt, g, capacity, rows=(3, 1, 5, 2), **kw):
    """Store random prefixes for ``rows``, stage them with a :class:`PrefixAttention` of ``capacity`` pages
    and compare its attention with the spec in every layer; returns the staging object. On CUDA the staged
    attention is FlashInfer's (base-2 log-sum-exp); the spec runs on the CPU in float32."""
    sh, P, dev = rt.shape, rt.layout.page_size, rt.device
    rows = list(rows)
    prefix = [8 * P, 0, 3 * P, 5 * P]  # the second request has no cached prefix
    ext = [5, 9, 1, 7]
    # the cached prefixes are in the tiers, at the rows' own pages
    hist = {}
    for layer in range(sh.n_layers):
        for r, m in zip(rows, prefix):
            k, v = _rand(g, m, sh.n_kv_heads, sh.head_dim), _rand(g, m, sh.n_kv_heads, sh.head_dim)
            k, v = k.to(sh.dtype), v.to(sh.dtype)
            if m:
                rt.store_tokens(layer, k.to(dev), v.to(dev), rt.req_to_token[r, :m].long())
            if rt.settings.kv_fp8:  # the tier holds the rounded values
                k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
            hist[layer, r] = (k.float(), v.float())
    pa = PrefixAttention(rt, capacity, **kw)
    assert pa.plan(torch.tensor(rows, device=dev), prefix, ext)
    assert len(pa.blocks) == -(-sum(prefix) // P // capacity)
    scale = sh.head_dim ** -0.5
    tol = 2e-5 if sh.dtype == torch.float32 else 2e-2
    for layer in range(sh.n_layers):
        t = sum(ext)
        q = _rand(g, t, sh.n_q_heads, sh.head_dim, scale=8.0 if sh.dtype == torch.float32 else 1.0).to(sh.dtype)
        kn, vn = (_rand(g, t, sh.n_kv_heads, sh.head_dim).to(sh.dtype) for _ in range(2))
        parts = [attention_lse(q[a:a + n].float(), kn[a:a + n].float(), vn[a:a + n].float(), scale, causal=True)
                 for a, n in zip([0, 5, 14, 15], ext)]
        o = torch.cat([p[0] for p in parts]).to(sh.dtype)
        s = torch.cat([p[1] for p in parts])
        if rt.is_cuda:
            s = s / math.log(2)
        got = pa.attend(layer, q.to(dev), o.to(dev), s.to(dev), scale).cpu()
        a = 0
        for r, n in zip(rows, ext):
            kp, vp = hist[layer, r]
            want = extend_attention(q[a:a + n].float(), kn[a:a + n].float(), vn[a:a + n].float(), kp, vp, scale)
            torch.testing.assert_close(got[a:a + n].float(), want, atol=tol, rtol=tol, msg=lambda m: f"row {r}: {m}")
            a += n
    pa.finish()
    return pa


@pytest.mark.parametrize("capacity", [64, 7, 3])  # one block per layer; blocks spanning requests; tiny blocks
def test_staged_prefix_attention_equals_the_spec(capacity):
    g = torch.Generator().manual_seed(2)
    pa = _check_staged_prefix_attention(_runtime(g), g, capacity)
    assert pa.copied["dma"] == 0 and pa.copied["gather"] > 0  # scattered single pages: all gathered


def test_page_runs_are_maximal_and_stop_at_the_gpu_tier():
    assert page_runs([], 10) == []
    assert page_runs([4, 5, 6, 9, 10, 3], 100) == [(4, 0, 3), (9, 3, 2), (3, 5, 1)]
    assert page_runs([8, 9, 10, 11], 10) == [(8, 0, 2), (10, 2, 2)]  # pages 10, 11 are the GPU tier's


@pytest.mark.parametrize("capacity", [64, 7, 3])
@pytest.mark.parametrize("min_pages", [1, 3, 100])  # every run, runs of 3+ pages, none as block copies
def test_block_copies_of_page_runs_stage_the_same_prefix(capacity, min_pages):
    """Rows whose pages are consecutive: long runs go as block copies, the rest through the gather kernel,
    and the staged prefix is the same whichever way each page came."""
    g = torch.Generator().manual_seed(6)
    rt = _runtime(g, alloc="contiguous")
    page_bytes = rt.shape.n_kv_heads * rt.layout.page_size * rt.shape.head_dim * 4
    pa = _check_staged_prefix_attention(rt, g, capacity, dma_min_bytes=min_pages * page_bytes)
    total = 2 * rt.shape.n_layers * 16 * page_bytes  # 16 prefix pages, K and V, every layer
    assert pa.copied["dma"] + pa.copied["gather"] == total
    assert (pa.copied["dma"] == 0) == (min_pages > capacity or min_pages == 100)
    if min_pages == 1:
        assert pa.copied["gather"] == 0


def test_block_copies_read_the_gpu_tier_pages_from_the_gpu_tier():
    g = torch.Generator().manual_seed(7)
    rt = _runtime(g, alloc="contiguous", n_gpu_pages=40)  # rows 5 and 6 live partly or wholly in the GPU tier
    pa = _check_staged_prefix_attention(rt, g, 64, rows=(3, 1, 5, 6), dma_min_bytes=1)
    assert pa.copied["gather"] == 0 and any(first >= rt.host.n_pages for first, _, _ in pa.blocks[0].copies.runs)


def test_an_fp8_tier_is_gathered_and_widened():
    g = torch.Generator().manual_seed(8)
    rt = _runtime(g, alloc="contiguous", dtype=torch.bfloat16, kv_fp8=True)
    pa = _check_staged_prefix_attention(rt, g, 64, dma_min_bytes=1)
    assert not pa.dma and pa.copied["dma"] == 0 and pa.copied["gather"] > 0


def test_no_prefix_plans_nothing_and_unaligned_prefix_is_refused():
    g = torch.Generator().manual_seed(3)
    rt = _runtime(g)
    pa = PrefixAttention(rt, 8)
    assert not pa.plan(torch.tensor([1, 2]), [0, 0], [5, 6])
    with pytest.raises(NotImplementedError, match="whole number"):
        pa.plan(torch.tensor([1]), [6], [3])


def test_attending_out_of_order_or_too_few_layers_is_an_error():
    g = torch.Generator().manual_seed(4)
    rt = _runtime(g)
    pa = PrefixAttention(rt, 8)
    pa.plan(torch.tensor([1]), [4 * rt.layout.page_size], [2])
    q = torch.randn(2, rt.shape.n_q_heads, rt.shape.head_dim)
    o, s = torch.zeros_like(q), torch.zeros(2, rt.shape.n_q_heads)
    with pytest.raises(RuntimeError, match="expected layer 0"):
        pa.attend(1, q, o, s, 1.0)
    pa.attend(0, q, o, s, 1.0)
    with pytest.raises(RuntimeError, match="1 of 2 units"):
        pa.finish()


@pytest.mark.parametrize("page_scoring", ["quest", "grid2"])
def test_prefill_in_chunks_leaves_the_state_of_one_prefill(page_scoring, monkeypatch):
    """A prompt prefilled as cached prefix + new tokens (radix hit, next chunk) leaves the runtime exactly as
    one prefill of the whole prompt: host tier, digests of every page, each head's selected pages, the
    working-set slots of the first decode step, and no previous query. grid2 (sink of 3 pages: one cached prefix
    covers it, one ends inside it): the rows' grids are refitted to the same values, the codes of every page beyond
    the sink are the same, and those of the cached pages are not rewritten."""
    g = torch.Generator().manual_seed(5)
    kw = dict(page_scoring="grid2", d=64, n_sink=3) if page_scoring == "grid2" else {}
    rt_one, rt_two = _runtime(torch.Generator().manual_seed(9), **kw), _runtime(torch.Generator().manual_seed(9), **kw)
    sh, lay = rt_one.shape, rt_one.layout
    P = lay.page_size
    rows = torch.tensor([4, 2, 6])
    total, prefix = [61, 45, 23], [8 * P, 0, 2 * P]  # the second request has no cached prefix
    ext = [n - m for n, m in zip(total, prefix)]
    has = [i for i, m in enumerate(prefix) if m]
    rt_two.prefix = PrefixAttention(rt_two, 5)  # 10 prefix pages in units of at most 5
    data = []  # per layer, per request: q, k, v, token slots
    for layer in range(sh.n_layers):
        data.append([(_rand(g, n, sh.n_q_heads, sh.head_dim), _rand(g, n, sh.n_kv_heads, sh.head_dim),
                      _rand(g, n, sh.n_kv_heads, sh.head_dim), rt_one.req_to_token[r, :n].long())
                     for r, n in zip(rows.tolist(), total)])

    def part(layer, which, cut):
        return [torch.cat([cut(data[layer][i][j], i) for i in which]) for j in range(4)]

    for layer in range(sh.n_layers):  # one prefill of every whole prompt
        q, k, v, loc = part(layer, range(3), lambda x, i: x)
        rt_one.prefill_layer_offload(layer, q, k, v, rows, total, loc)
    for layer in range(sh.n_layers):  # the cached prefixes (an earlier request, or chunk)
        q, k, v, loc = part(layer, has, lambda x, i: x[:prefix[i]])
        rt_two.prefill_layer_offload(layer, q, k, v, rows[has], [prefix[i] for i in has], loc)
    assert rt_two.plan_prefill(rows, prefix, ext)
    grid = page_scoring == "grid2"
    written = []
    if grid:  # the pages whose codes the rest of the prefill writes: not those of the cached prefixes
        from freekv_sglang.runtime import engine

        cached = torch.cat([rt_one.req_to_token[r, lay.n_sink * P:m:P].long() // P
                            for r, m in zip(rows.tolist(), prefix)])
        assert cached.numel() == 5
        pack = engine.pack_grid_codes

        def spy(src, row0, dst_page, *a, **kw):
            written.append(dst_page[row0 >= 0].clone())
            return pack(src, row0, dst_page, *a, **kw)

        monkeypatch.setattr(engine, "pack_grid_codes", spy)
    for layer in range(sh.n_layers):  # the rest, over its cached prefix
        q, k, v, loc = part(layer, range(3), lambda x, i: x[prefix[i]:])
        rt_two.prefix_attention(layer, q, torch.zeros_like(q), torch.zeros(q.shape[:2]), 1.0)
        rt_two.prefill_layer_offload(layer, q, k, v, rows, ext, loc, prefix)
    rt_two.finish_prefill()
    locs = torch.cat([rt_one.req_to_token[r, :n].long() for r, n in zip(rows.tolist(), total)])
    full = torch.cat([rt_one.req_to_token[r, :n - n % P:P].long() // P for r, n in zip(rows.tolist(), total)])
    if grid:
        written = torch.cat(written)
        assert written.numel() and not bool(torch.isin(written, cached).any())
        full = torch.cat([rt_one.req_to_token[r, lay.n_sink * P:n - n % P:P].long() // P
                          for r, n in zip(rows.tolist(), total)])  # sink pages get no codes
        assert torch.equal(rt_two.grid_lo[:, rows], rt_one.grid_lo[:, rows])
        assert torch.equal(rt_two.grid_step[:, rows], rt_one.grid_step[:, rows])
        assert bool((rt_one.grid_step[:, rows] > 0).all())
    for layer in range(sh.n_layers):  # (only the prompts' tokens were written: compare those)
        for tier in ("k", "v"):
            one, two = (getattr(rt.host, tier)(layer)[locs // P, :, locs % P] for rt in (rt_one, rt_two))
            torch.testing.assert_close(two, one)
        torch.testing.assert_close(rt_two.digests[layer, full], rt_one.digests[layer, full])
        torch.testing.assert_close(rt_two.resident[layer, rows], rt_one.resident[layer, rows])
        assert not rt_two.q_valid[layer, rows].any()
        for r, n in zip(rows.tolist(), total):
            slots = torch.tensor(lay.page_table(n + 1)[0]) + r * lay.slots
            for kv in (0, 1):  # every page of the table is full but the current one, which holds n % P tokens
                a, b = rt_two.ws[layer, kv, slots], rt_one.ws[layer, kv, slots]
                torch.testing.assert_close(a[:-1], b[:-1], msg=lambda m: f"layer {layer} row {r}: {m}")
                torch.testing.assert_close(a[-1, :n % P], b[-1, :n % P])


def test_each_block_plans_its_own_flashinfer_wrapper(monkeypatch):
    """On CUDA every block plans the wrapper of its own index with its own requests' query and page counts
    (a batch of three requests whose prefixes fill three blocks: request indices exceed the block count)."""
    import sys
    import types

    planned = []

    class FakeWrapper:
        def __init__(self, workspace, layout):
            self.plans = []

        def plan(self, qo, kv, indices, last_page_len, hq, hkv, d, page, **kw):
            self.plans.append((qo.tolist(), kv.tolist(), indices.tolist()))
            planned.append(self)

    monkeypatch.setitem(sys.modules, "flashinfer", types.SimpleNamespace(BatchPrefillWithPagedKVCacheWrapper=FakeWrapper))
    g = torch.Generator().manual_seed(5)
    rt = _runtime(g)
    P = rt.layout.page_size
    pa = PrefixAttention(rt, 4)
    prefix, ext = [0, 3 * P, 5 * P], [2, 3, 4]  # 8 prefix pages in blocks of 4: [r1 p0-2, r2 p0], [r2 p1-4]
    assert pa.plan(torch.tensor([1, 2, 3]), prefix, ext)
    assert len(pa.blocks) == 2
    wrappers = [pa._plan_wrapper(i, blk, ext) for i, blk in enumerate(pa.blocks)]
    assert wrappers[0] is not wrappers[1] and len(pa._wrappers) == 2
    assert wrappers[0].plans == [([0, 3, 7], [0, 3, 4], [0, 1, 2, 3])]
    assert wrappers[1].plans == [([0, 4], [0, 4], [0, 1, 2, 3])]
