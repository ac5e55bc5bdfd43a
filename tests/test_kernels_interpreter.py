"""The Triton kernels under Triton's CPU interpreter, against their torch references.

Whether a ``@triton.jit`` function is interpreted is decided when it is *defined*, from
``TRITON_INTERPRET``. Other tests of the same pytest process may already have imported the
kernel modules compiled-mode, so this module re-runs itself in a fresh interpreter with
``TRITON_INTERPRET=1`` (one parent test; the child's pytest report is shown on failure).
Run the child directly with ``TRITON_INTERPRET=1 pytest tests/test_kernels_interpreter.py``.

The "host" tensors are plain CPU tensors here: pinned memory and UVA need a GPU.
"""

from __future__ import annotations

import os

import pytest

CHILD = os.environ.get("TRITON_INTERPRET") == "1"

if not CHILD:

    def test_triton_kernels_under_interpreter(module_under_interpreter):
        module_under_interpreter(__file__)

else:

    import torch

    import freekv_sglang.kernels as K  # noqa: E402
    from freekv_sglang.algorithm import WorkingSetLayout, page_digests  # noqa: E402
    from freekv_sglang.algorithm.selection import topk_pages  # noqa: E402

    DTYPES = (torch.bfloat16, torch.float16)

    def _g(seed):
        return torch.Generator().manual_seed(seed)

    def _randn(g, *shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    def test_interpreter_is_on():
        from freekv_sglang.kernels.common import interpreter_forced
        from freekv_sglang.kernels import kv_store
        assert interpreter_forced()
        assert type(kv_store._store_kv_host_kernel).__name__ == "InterpretedFunction"
        t = torch.zeros(3)
        assert K.kernel_arg(t) is t

    # ----------------------------------------------------------------------------- store
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("p,hkv,d,nprog", [(8, 1, 64, None), (16, 3, 128, None), (32, 2, 16, None),
                                               (16, 3, 128, 2), (8, 2, 64, 5)])
    def test_store(dtype, p, hkv, d, nprog):
        g = _g(11)
        n_pages, t, hq = 6, 37, 2 * hkv
        qkv = _randn(g, t, hq + 2 * hkv, d, dtype=dtype)
        k, v = qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]  # strided views, as after the QKV projection
        loc = torch.randperm(n_pages * p, generator=g)[:t]
        loc[5::9] = -1
        hk = torch.full((n_pages, hkv, p, d), float("nan"), dtype=dtype)
        hv = hk.clone()
        rk, rv = hk.clone(), hv.clone()
        K.store_kv_host(hk, hv, k, v, loc, num_programs=nprog, impl="triton")  # nprog: a persistent grid
        K.store_kv_host(rk, rv, k, v, loc, impl="torch")
        assert torch.equal(hk.nan_to_num(5.0), rk.nan_to_num(5.0))
        assert torch.equal(hv.nan_to_num(5.0), rv.nan_to_num(5.0))
        assert int((~hk.isnan()).sum()) == int((loc >= 0).sum()) * hkv * d

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_store_with_gpu_tier(dtype):
        """Pages from n_host on go to the GPU tier: host + tier equal one store of all pages."""
        g = _g(21)
        p, hkv, d, n_host, n_gpu, t = 8, 2, 64, 4, 3, 41
        k, v = _randn(g, t, hkv, d, dtype=dtype), _randn(g, t, hkv, d, dtype=dtype)
        loc = torch.randperm((n_host + n_gpu) * p, generator=g)[:t]
        loc[3::7] = -1
        for impl in ("triton", "torch"):
            hk, hv = (torch.full((n_host, hkv, p, d), float("nan"), dtype=dtype) for _ in range(2))
            gk, gv = (torch.full((n_gpu, hkv, p, d), float("nan"), dtype=dtype) for _ in range(2))
            K.store_kv_host(hk, hv, k, v, loc, gpu_k=gk, gpu_v=gv, impl=impl)
            ak, av = (torch.full((n_host + n_gpu, hkv, p, d), float("nan"), dtype=dtype) for _ in range(2))
            K.store_kv_host(ak, av, k, v, loc, impl="torch")
            assert torch.equal(torch.cat([hk, gk]).nan_to_num(5.0), ak.nan_to_num(5.0)), impl
            assert torch.equal(torch.cat([hv, gv]).nan_to_num(5.0), av.nan_to_num(5.0)), impl
            assert not gk.isnan().all() and not hk.isnan().all()

    def fp8_exact(x):
        """Values an FP8 e4m3 tier holds exactly, without subnormals: Triton's CPU interpreter converts to
        FP8 without carrying a rounded mantissa into the exponent and flushes subnormals (the GPU converts
        like torch), so interpreter tests feed values that need no rounding; the GPU tests feed raw ones."""
        y = x.float().to(torch.float8_e4m3fn).float()
        return torch.where(y.abs() < 2.0 ** -6, torch.zeros_like(y), y).to(x.dtype)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("nprog", [None, 3])
    def test_store_fp8_tier(dtype, nprog):
        """An FP8 host tier (and GPU tier): values saturate at +-448 and are stored as torch stores them."""
        g = _g(22)
        p, hkv, d, n_host, n_gpu, t = 8, 2, 64, 4, 3, 41
        k, v = fp8_exact(30 * _randn(g, t, hkv, d, dtype=dtype)), fp8_exact(_randn(g, t, hkv, d, dtype=dtype))
        k[0, 0, :4] = torch.tensor([1000.0, -1000.0, 448.0, 0.125])
        loc = torch.randperm((n_host + n_gpu) * p, generator=g)[:t]
        loc[3::7] = -1
        outs = []
        for impl in ("triton", "torch"):
            tiers = [torch.zeros((n, hkv, p, d), dtype=torch.float8_e4m3fn) for n in (n_host, n_host, n_gpu, n_gpu)]
            K.store_kv_host(tiers[0], tiers[1], k, v, loc, gpu_k=tiers[2], gpu_v=tiers[3], num_programs=nprog,
                            impl=impl)
            outs.append([x.view(torch.uint8) for x in tiers])
        for a, b in zip(*outs):
            assert torch.equal(a, b)
        full = torch.cat([outs[0][0], outs[0][2]]).view(torch.float8_e4m3fn).float()
        i = int(loc[0])
        assert full[i // p, 0, i % p, :4].tolist() == [448.0, -448.0, 448.0, 0.125]

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_recall_gather_widens_an_fp8_tier(dtype):
        g = _g(23)
        p, hkv, d, n_pages, n_slots, n, split = 8, 3, 64, 9, 7, 15, 5
        ak = fp8_exact(_randn(g, n_pages, hkv, p, d)).to(torch.float8_e4m3fn)
        av = fp8_exact(_randn(g, n_pages, hkv, p, d)).to(torch.float8_e4m3fn)
        pairs = torch.randperm(n_slots * hkv, generator=g)[:n]
        slot, head = (pairs // hkv), (pairs % hkv)
        page = torch.randint(0, n_pages, (n,), generator=g)
        want = [torch.full((n_slots, p, hkv, d), float("nan"), dtype=dtype) for _ in range(2)]
        K.recall_gather(ak.to(dtype), av.to(dtype), *want, page, slot, head, impl="torch")
        for impl in ("triton", "torch"):
            got = [torch.full((n_slots, p, hkv, d), float("nan"), dtype=dtype) for _ in range(2)]
            K.recall_gather(ak[:split], av[:split], *got, page, slot, head, gpu_k=ak[split:], gpu_v=av[split:],
                            impl=impl)
            for a, b in zip(got, want):
                assert torch.equal(a.nan_to_num(2.0), b.nan_to_num(2.0)), impl
        from freekv_sglang.kernels.recall import _check as recall_check

        with pytest.raises(ValueError, match="copies bytes"):  # staged / per-page copy bytes: no FP8 tier
            recall_check(ak, av, want[0], want[1], page, slot, head, widen=False)

    # --------------------------------------------------------------------------- digests
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("p,hkv,d", [(8, 2, 64), (32, 3, 128), (256, 1, 16)])
    def test_digests(dtype, p, hkv, d):
        g = _g(12)
        n_slots = 5
        ws = _randn(g, n_slots, p, hkv, d, dtype=dtype)
        src = ws.view(-1, hkv, d)
        row0 = torch.tensor([0, 3 * p, -1, 2 * p, 4 * p], dtype=torch.int32)
        dst = torch.tensor([6, 0, 3, 2, 5], dtype=torch.int64)
        dig = torch.full((8, hkv, 2, d), float("nan"), dtype=dtype)
        ref = dig.clone()
        K.page_digests_from_rows(src, row0, dst, dig, page_size=p, impl="triton")
        K.page_digests_from_rows(src, row0, dst, ref, page_size=p, impl="torch")
        assert torch.equal(dig.nan_to_num(3.0), ref.nan_to_num(3.0))
        assert dig[[1, 3, 4, 7]].isnan().all() and not dig[[0, 2, 5, 6]].isnan().any()
        assert torch.equal(dig[0], page_digests(ws[3:4].view(-1, hkv, d), p)[0])

    # ---------------------------------------------------------------------------- scores
    def _score_inputs(g, dtype, hkv, grp, d, p, b, max_ctx):
        n_host = 48
        keys = _randn(g, n_host * p, hkv, d, dtype=dtype)
        dig = page_digests(keys, p).contiguous()
        r2t = torch.randint(0, n_host * p, (b + 2, max_ctx), generator=g, dtype=torch.int32)
        rpi = torch.randperm(b + 2, generator=g)[:b]
        n_ctx = torch.randint(1, max_ctx + 1, (b,), generator=g, dtype=torch.int32)
        n_ctx[0] = max_ctx
        qkv = _randn(g, b, hkv * grp + 2 * hkv, d, dtype=dtype)
        q = qkv[:, : hkv * grp]  # strided rows
        return q, dig, r2t, rpi, n_ctx

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("agg", ["mean", "max", "softmax-mean"])
    @pytest.mark.parametrize("grp,d", [(1, 64), (3, 64), (4, 128), (7, 64)])
    def test_scores(dtype, agg, grp, d):
        g = _g(13)
        p, hkv, b = 8, 2, 3
        max_ctx = 50 * p  # max_pages = 50: not a multiple of the page block
        q, dig, r2t, rpi, n_ctx = _score_inputs(g, dtype, hkv, grp, d, p, b, max_ctx)
        hm = torch.tensor([[True, False], [True, True], [False, True]])
        for mask in (None, hm):
            out = torch.full((b, hkv, 50), float("nan"))
            ref = out.clone()
            kw = dict(page_size=p, n_sink=2, n_window=3, aggregation=agg)
            K.score_pages(q, dig, r2t, rpi, n_ctx, mask, out, impl="triton", block_n=16, heads_fast=grp == 3, **kw)
            K.score_pages(q, dig, r2t, rpi, n_ctx, mask, ref, impl="torch", **kw)
            assert not out.isnan().any()
            assert torch.equal(torch.isinf(out), torch.isinf(ref))
            fin = torch.isfinite(ref)
            assert fin.any()
            torch.testing.assert_close(out[fin], ref[fin], rtol=1e-5, atol=1e-5 * ref[fin].abs().max().item())

    @pytest.mark.parametrize("grp,d", [(3, 64), (4, 128)])
    def test_scores_head_major_digests(grp, d):
        """Digests stored head-major (``[Hkv, pages, 2, D]``, seen as ``[pages, Hkv, 2, D]``): the scores
        of the contiguous layout; a digest whose ``[2, D]`` is not contiguous is refused."""
        g = _g(17)
        p, hkv, b = 8, 2, 3
        q, dig, r2t, rpi, n_ctx = _score_inputs(g, torch.bfloat16, hkv, grp, d, p, b, 40 * p)
        hm = dig.transpose(0, 1).contiguous().transpose(0, 1)
        assert torch.equal(hm, dig) and not hm.is_contiguous()
        kw = dict(page_size=p, n_sink=2, n_window=3, aggregation="mean")
        want = torch.full((b, hkv, 40), float("nan"))
        got = want.clone()
        K.score_pages(q, dig, r2t, rpi, n_ctx, None, want, impl="triton", block_n=16, **kw)
        K.score_pages(q, hm, r2t, rpi, n_ctx, None, got, impl="triton", block_n=16, **kw)
        assert torch.isfinite(want).any() and torch.equal(got, want)
        with pytest.raises(ValueError, match=r"\[2, D\] must be contiguous"):
            K.score_pages(q, dig.transpose(2, 3).contiguous().transpose(2, 3), r2t, rpi, n_ctx, None, got,
                          impl="triton", block_n=16, **kw)

    # ---------------------------------------------------------------------------- select
    @pytest.mark.parametrize("np_,k", [(40, 8), (5, 8), (64, 32), (30, 12), (20, 20)])
    def test_select(np_, k):
        g = _g(14)
        b, hkv = 2, 3
        s0 = torch.randn(b, hkv, np_, generator=g)
        s1 = s0 + 0.6 * torch.randn(b, hkv, np_, generator=g)
        s1[torch.rand(s1.shape, generator=g) < 0.25] = float("-inf")
        s1[0, 2] = float("-inf")
        res = topk_pages(s0, k)[..., torch.randperm(k, generator=g)]
        res[1, 0, :3] = -1
        hm = torch.rand(b, hkv, generator=g) < 0.5
        for mask in (None, hm):
            a = K.select_and_diff(s1, res, mask, k, impl="triton")
            r = K.select_and_diff(s1, res, mask, k, impl="torch")
            for x, y in zip(a, r):
                assert torch.equal(x, y)
        # in place into an int32 resident buffer
        res32 = res.to(torch.int32)
        a = K.select_and_diff(s1, res32, hm, k, resident_out=res32, impl="triton")
        r = K.select_and_diff_reference(s1, res, hm, k)
        assert a.resident is res32 and torch.equal(res32.long(), r.resident)

    # ---------------------------------------------------------------------------- recall
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("p,hkv,d,nprog", [(8, 3, 64, 2), (32, 2, 128, 64), (256, 1, 16, 1), (16, 8, 32, 5)])
    def test_recall_gather(dtype, p, hkv, d, nprog):
        g = _g(15)
        n_pages, n_slots, n = 9, 7, 12
        hk = _randn(g, n_pages, hkv, p, d, dtype=dtype)
        hv = _randn(g, n_pages, hkv, p, d, dtype=dtype)
        wk = torch.full((n_slots, p, hkv, d), float("nan"), dtype=dtype)
        wv = wk.clone()
        rk, rv = wk.clone(), wv.clone()
        n = min(n, n_slots * hkv)
        pairs = torch.randperm(n_slots * hkv, generator=g)[:n]
        slot, head = (pairs // hkv), (pairs % hkv)
        page = torch.randint(0, n_pages, (n,), generator=g)
        slot[1::4] = -1
        K.recall_gather(hk, hv, wk, wv, page, slot, head, num_programs=nprog, impl="triton")
        K.recall_gather(hk, hv, rk, rv, page, slot, head, impl="torch")
        assert torch.equal(wk.nan_to_num(2.0), rk.nan_to_num(2.0))
        assert torch.equal(wv.nan_to_num(2.0), rv.nan_to_num(2.0))
        assert int((~wk.isnan()).sum()) == int((slot >= 0).sum()) * p * d

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("split", [1, 4, 8])
    def test_recall_gather_with_gpu_tier(dtype, split):
        """Pages from ``split`` on come from the GPU tier; the result equals a recall from one store."""
        g = _g(16)
        p, hkv, d, n_pages, n_slots, n = 8, 3, 64, 9, 7, 15
        ak = _randn(g, n_pages, hkv, p, d, dtype=dtype)
        av = _randn(g, n_pages, hkv, p, d, dtype=dtype)
        pairs = torch.randperm(n_slots * hkv, generator=g)[:n]
        slot, head = (pairs // hkv), (pairs % hkv)
        page = torch.randint(0, n_pages, (n,), generator=g)
        page[0], page[1] = 0, n_pages - 1  # both ends of both tiers
        slot[2::5] = -1
        want = [torch.full((n_slots, p, hkv, d), float("nan"), dtype=dtype) for _ in range(2)]
        K.recall_gather(ak, av, *want, page, slot, head, impl="torch")
        for impl in ("triton", "torch"):
            got = [torch.full((n_slots, p, hkv, d), float("nan"), dtype=dtype) for _ in range(2)]
            K.recall_gather(ak[:split], av[:split], *got, page, slot, head, gpu_k=ak[split:], gpu_v=av[split:],
                            num_programs=3, impl=impl)
            for a, b in zip(got, want):
                assert torch.equal(a.nan_to_num(2.0), b.nan_to_num(2.0)), impl

    def _tiers_past_2g_elements(g, dtype):
        """A host tier of more than 2**31 elements (4 GiB, allocated but untouched except the pages
        the caller reads) beside a 4-page GPU tier: GPU-tier element offsets pass int32's range, as
        a 390 GiB host tier does on a server."""
        p, hkv, d = 16, 2, 16
        n_host = 2**31 // (hkv * p * d) + 2
        hk = torch.empty((n_host, hkv, p, d), dtype=dtype)
        hv = torch.empty((n_host, hkv, p, d), dtype=dtype)
        used = torch.tensor([0, 1, n_host - 2, n_host - 1])
        hk[used] = _randn(g, 4, hkv, p, d, dtype=dtype)
        hv[used] = _randn(g, 4, hkv, p, d, dtype=dtype)
        gk = _randn(g, 4, hkv, p, d, dtype=dtype)
        gv = _randn(g, 4, hkv, p, d, dtype=dtype)
        return hk, hv, gk, gv, used

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_recall_gather_gpu_tier_behind_a_large_host_tier(dtype):
        g = _g(31)
        hk, hv, gk, gv, used = _tiers_past_2g_elements(g, dtype)
        n_host, hkv, p, d = hk.shape
        page = torch.cat([used, n_host + torch.arange(4)])
        n = page.numel()
        slot = torch.arange(n)
        head = torch.arange(n) % hkv
        ref = [torch.full((n, p, hkv, d), float("nan"), dtype=dtype) for _ in range(2)]
        K.recall_gather(hk, hv, *ref, page, slot, head, gpu_k=gk, gpu_v=gv, impl="torch")
        assert torch.equal(ref[0][n - 1, :, head[-1]], gk[3, head[-1]])  # the reference reads the GPU tier
        got = [torch.full((n, p, hkv, d), float("nan"), dtype=dtype) for _ in range(2)]
        K.recall_gather(hk, hv, *got, page, slot, head, gpu_k=gk, gpu_v=gv, num_programs=3, impl="triton")
        for a, b in zip(got, ref):
            assert torch.equal(a.nan_to_num(2.0), b.nan_to_num(2.0))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_recall_selected_gpu_tier_behind_a_large_host_tier(dtype):
        g = _g(32)
        hk, hv, gk, gv, used = _tiers_past_2g_elements(g, dtype)
        n_host, hkv, p, d = hk.shape
        k, n_logical = 4, 8  # one request, 8 logical pages: host pages then GPU-tier pages
        host_pages = torch.cat([used, n_host + torch.arange(4)])
        r2t = (host_pages[:, None] * p + torch.arange(p)).reshape(1, n_logical * p).int()
        rows = torch.zeros(1, dtype=torch.long)
        recall_page = torch.stack([torch.tensor([1, 3, 4, 7]), torch.tensor([0, 2, 5, 6])])[None]  # [1, Hkv, k]
        recall_slot = torch.arange(k).expand(1, hkv, k).clone()
        recall_slot[0, 1, 3] = -1
        outs = []
        for impl in ("torch", "triton"):
            ws = [torch.full((k + 1, p, hkv, d), float("nan"), dtype=dtype) for _ in range(2)]
            K.recall_selected(hk, hv, *ws, recall_slot, recall_page, r2t, rows, page_size=p, slot_base=k + 1,
                              select_slot0=1, gpu_k=gk, gpu_v=gv, impl=impl)
            outs.append(ws)
        assert torch.equal(outs[0][1][1 + 2, :, 0], gv[0, 0])  # logical page 4 = first GPU-tier page
        for a, b in zip(*outs):
            assert torch.equal(a.nan_to_num(2.0), b.nan_to_num(2.0))

    def test_gpu_tier_must_match_the_host_pages():
        hk = torch.zeros(4, 2, 8, 16, dtype=torch.bfloat16)
        ws = torch.zeros(3, 8, 2, 16, dtype=torch.bfloat16)
        i = torch.zeros(1, dtype=torch.int64)
        with pytest.raises(ValueError, match="together"):
            K.recall_gather(hk, hk, ws, ws, i, i, i, gpu_k=hk)
        with pytest.raises(ValueError, match="does not match"):
            K.recall_gather(hk, hk, ws, ws, i, i, i, gpu_k=hk[:, :1].contiguous(), gpu_v=hk[:, :1].contiguous())

    def test_recall_from_selection():
        """select -> pieces -> gather moves exactly the missing pages into their slots."""
        g = _g(16)
        lay = WorkingSetLayout(8, 2, 4, 2)
        p, hkv, d, b = 8, 2, 16, 2
        max_ctx, n_host = 160, 64
        r2t = torch.randperm(n_host * p, generator=g)[: 3 * max_ctx].view(3, max_ctx).int()
        rpi = torch.tensor([2, 0])
        hk = _randn(g, n_host, hkv, p, d, dtype=torch.bfloat16)
        hv = _randn(g, n_host, hkv, p, d, dtype=torch.bfloat16)
        scores = torch.randn(b, hkv, max_ctx // p, generator=g)
        res = torch.full((b, hkv, lay.n_select), -1, dtype=torch.long)
        upd = K.select_and_diff(scores, res, None, lay.n_select, impl="triton")
        pieces = K.recall_selected_pieces(upd.recall_slot, upd.recall_page, r2t, rpi, page_size=p,
                                          slot_base=lay.slots, select_slot0=lay.n_sink)
        wk = torch.full((3 * lay.slots, p, hkv, d), float("nan"), dtype=torch.bfloat16)
        wv = wk.clone()
        K.recall_gather(hk, hv, wk, wv, *pieces, impl="triton")
        for i in range(b):
            r = int(rpi[i])
            for h in range(hkv):
                for j in range(lay.n_select):
                    pg = int(upd.resident[i, h, j])
                    hp = int(r2t[r, pg * p]) // p
                    assert torch.equal(wk[r * lay.slots + lay.n_sink + j, :, h], hk[hp, h])
                    assert torch.equal(wv[r * lay.slots + lay.n_sink + j, :, h], hv[hp, h])

    # ------------------------------------------------------------------ split decode
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("grp,d", [(1, 64), (3, 64), (4, 128), (7, 64)])
    @pytest.mark.parametrize("n_split,ppi", [(1, 1), (8, 1), (1, 2), (3, 4)])
    def test_split_decode(dtype, grp, d, n_split, ppi):
        """Working-set attention split along the slots and merged equals paged attention over the
        same page table: requests of different lengths, partial last pages, a one-slot request."""
        g = _g(40 + grp)
        lay = WorkingSetLayout(page_size=16, n_sink=1, n_select=3, n_window=2)
        S, hkv = lay.slots, 2
        lens = torch.tensor([5, 200, 16, 77])
        rows = torch.tensor([3, 1, 0, 2])
        b = len(lens)
        ip = torch.zeros(b + 1, dtype=torch.int32)
        ix = torch.zeros(b * S, dtype=torch.int32)
        lp = torch.zeros(b, dtype=torch.int32)
        K.build_page_table(lens, rows, ip, ix, lp, layout=lay, slot_base=S)
        q = _randn(g, b, hkv * grp, d, dtype=dtype)
        wk = _randn(g, 4 * S, 16, hkv, d, dtype=dtype)
        wv = _randn(g, 4 * S, 16, hkv, d, dtype=dtype)
        scale = 1.0 / d ** 0.5
        want = K.sparse_decode_reference(q, wk, wv, ip, ix, lp, scale)
        got = K.split_decode_attention(q, wk, wv, ip, ix, lp, max_slots=S, sm_scale=scale, n_split=n_split,
                                       pages_per_iter=ppi)
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
        # the table's first rows only: a smaller batch reads a prefix of the same buffers; partial results
        # in a workspace (filled with NaN first: every value read must have been written)
        ws = torch.full((1 << 20,), 255, dtype=torch.uint8)
        sd = K.SplitDecode(ip, ix, lp, S, workspace=ws)
        torch.testing.assert_close(sd.run(q[:2], wk, wv, scale).float(), want[:2], atol=2e-2, rtol=2e-2)

    def _split_problem(g, dtype, grp, d, q_scale=1.0):
        """Four requests of different lengths (partial last pages, a one-slot request) over working sets
        of 16-token pages; queries standard normal times ``q_scale``."""
        lay = WorkingSetLayout(page_size=16, n_sink=1, n_select=3, n_window=2)
        S, hkv = lay.slots, 2
        lens = torch.tensor([5, 200, 16, 77])
        rows = torch.tensor([3, 1, 0, 2])
        b = len(lens)
        ip = torch.zeros(b + 1, dtype=torch.int32)
        ix = torch.zeros(b * S, dtype=torch.int32)
        lp = torch.zeros(b, dtype=torch.int32)
        K.build_page_table(lens, rows, ip, ix, lp, layout=lay, slot_base=S)
        q = (torch.randn(b, hkv * grp, d, generator=g) * q_scale).to(dtype)
        wk = _randn(g, 4 * S, 16, hkv, d, dtype=dtype)
        wv = _randn(g, 4 * S, 16, hkv, d, dtype=dtype)
        return S, hkv, b, ip, ix, lp, q, wk, wv

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("grp,d,n_split,ppi", [(4, 128, 1, 1), (3, 64, 3, 4), (1, 64, 8, 1), (7, 64, 1, 2)])
    def test_split_decode_large_logits(dtype, grp, d, n_split, ppi):
        """Queries 64 times standard normal: logits q.k / sqrt(D) in the hundreds, past float32's exp range
        (88), so only a softmax that subtracts its running maximum, and a merge of the chunks (n_split > 1)
        that subtracts the largest log-sum-exp, gives finite outputs. The attention is then nearly one-hot;
        the output matches the float32 reference to the dtype's rounding, as with standard-normal queries."""
        S, hkv, b, ip, ix, lp, q, wk, wv = _split_problem(_g(60 + grp), dtype, grp, d, q_scale=64.0)
        scale = 1.0 / d ** 0.5
        logits = torch.einsum("bhgd,thd->bhgt", q.float().view(b, hkv, grp, d), wk.float().flatten(0, 1)) * scale
        assert logits.amax() > 150  # the case is what it says
        want = K.sparse_decode_reference(q, wk, wv, ip, ix, lp, scale)
        assert torch.isfinite(want).all()
        got = K.split_decode_attention(q, wk, wv, ip, ix, lp, max_slots=S, sm_scale=scale, n_split=n_split,
                                       pages_per_iter=ppi)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)

    def test_split_decode_default_tile_of_long_chunks():
        """Chunks of 8 or more slots read two slots per iteration by default: same attention as the
        reference (a request of a partial last slot, one of a single slot)."""
        from freekv_sglang.kernels.split_decode import default_pages_per_iter

        assert [default_pages_per_iter(n) for n in (1, 4, 7, 8, 64)] == [1, 1, 1, 2, 2]
        g = _g(77)
        lay = WorkingSetLayout(page_size=16, n_sink=2, n_select=5, n_window=2)  # 9 slots: one chunk, 2 per step
        S, hkv, grp, d = lay.slots, 2, 3, 64
        lens = torch.tensor([300, 9, 161])
        rows = torch.tensor([0, 2, 1])
        ip = torch.zeros(4, dtype=torch.int32)
        ix = torch.zeros(3 * S, dtype=torch.int32)
        lp = torch.zeros(3, dtype=torch.int32)
        K.build_page_table(lens, rows, ip, ix, lp, layout=lay, slot_base=S)
        q = _randn(g, 3, hkv * grp, d, dtype=torch.bfloat16)
        wk = _randn(g, 4 * S, 16, hkv, d, dtype=torch.bfloat16)
        wv = _randn(g, 4 * S, 16, hkv, d, dtype=torch.bfloat16)
        want = K.sparse_decode_reference(q, wk, wv, ip, ix, lp, 0.125)
        got = K.split_decode_attention(q, wk, wv, ip, ix, lp, max_slots=S, sm_scale=0.125, n_split=1)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)

    def test_split_decode_refuses_small_pages():
        q = torch.zeros(1, 2, 64, dtype=torch.bfloat16)
        ws = torch.zeros(3, 8, 1, 64, dtype=torch.bfloat16)
        i = torch.zeros(2, dtype=torch.int32)
        with pytest.raises(NotImplementedError, match="page size >= 16"):
            K.split_decode_attention(q, ws, ws, i, i, i[:1], max_slots=3)
        with pytest.raises(ValueError, match="pages_per_iter"):
            K.split_decode_attention(q, ws.new_zeros(3, 16, 1, 64), ws.new_zeros(3, 16, 1, 64), i, i, i[:1],
                                     max_slots=3, pages_per_iter=3)

    # ------------------------------------------------- fused kernels, large queries
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_prologue_large_queries(dtype):
        """The decode prologue with queries 64 times standard normal (squared norms past float16's range): the
        Triton kernel matches its reference, and a query of nearly the previous direction is not corrected."""
        from kernel_cases import LARGE_Q_SCALE, check_prologue

        for group in (1, 4):
            check_prologue("cpu", dtype, group, 16, q_scale=LARGE_Q_SCALE)

    @pytest.mark.parametrize("aggregation", ["mean", "max"])
    def test_score_select_large_queries(aggregation):
        """Fused scoring + selection with queries 64 times standard normal (page scores in the hundreds)."""
        from kernel_cases import LARGE_Q_SCALE, check_score_select

        check_score_select("cpu", torch.float16, 3, 16, k=4, aggregation=aggregation, q_scale=LARGE_Q_SCALE)
        check_score_select("cpu", torch.bfloat16, 2, 32, k=4, aggregation=aggregation, margin=2,
                           q_scale=LARGE_Q_SCALE)

    # ------------------------------------------------------------------------ page table
    @pytest.mark.parametrize("lay", [WorkingSetLayout(8, 3, 4, 3), WorkingSetLayout(32, 16, 32, 16),
                                     WorkingSetLayout(16, 0, 2, 2)])
    def test_page_table(lay):
        g = _g(17)
        p = lay.page_size
        seq = torch.cat([torch.tensor([1, p, p + 1, lay.slots * p, lay.slots * p + 1]),
                         torch.randint(1, 100 * p, (6,), generator=g)]).int()
        b = len(seq)
        rpi = torch.randperm(b + 2, generator=g)[:b].int()
        outs = []
        for impl in ("triton", "torch"):
            ip = torch.full((b + 1,), -9, dtype=torch.int32)
            ix = torch.full((b * lay.slots + 3,), -9, dtype=torch.int32)
            lp = torch.full((b,), -9, dtype=torch.int32)
            K.build_page_table(seq, rpi, ip, ix, lp, layout=lay, slot_base=lay.slots + 1, impl=impl)
            outs.append((ip, ix, lp))
        for x, y in zip(*outs):
            assert torch.equal(x, y)
        assert (outs[0][1][int(outs[0][0][-1]):] == -9).all()

    # ------------------------------------------------------------------ synthetic queries
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("hq,d", [(9, 64), (32, 128), (28, 128)])
    def test_synthetic_query_mix(dtype, hq, d):
        from freekv_sglang.kernels.synthetic_query import mix_queries, mix_queries_reference

        g = _g(23)
        b, slots = 5, 4
        q = _randn(g, b, hq, d, dtype=dtype) * 3
        q[1, 2] = 0  # a zero query: the norm is clamped
        u = torch.randn(slots, hq, d, generator=g)
        rows = torch.tensor([0, 7, 2, 4, 1])
        got = mix_queries(q, u, rows, 0.23, impl="triton")
        want = mix_queries_reference(q, u, rows, 0.23)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
        assert torch.isfinite(got).all()  # the zero query's norm is clamped: its output is u
        torch.testing.assert_close(got[1, 2].float(), u[7 % slots, 2], rtol=1e-2, atol=1e-2)

    # ------------------------------------------------------------------ streaming read (benchmark floor)
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("n,grid,block", [(5000, 3, 256), (4096, 4, 1024), (777, 8, 64)])
    def test_stream_sum(dtype, n, grid, block):
        from freekv_sglang.kernels.stream_read import stream_sum, stream_sum_reference

        x = _randn(_g(31), n, dtype=dtype) + 0.5  # nonzero mean: a skipped or doubled block shows
        out = torch.full((grid,), float("nan"))
        stream_sum(x, out, block=block, impl="triton")
        want = stream_sum_reference(x, grid, block)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(out.sum(), x.float().sum(), rtol=1e-4, atol=1e-2)
