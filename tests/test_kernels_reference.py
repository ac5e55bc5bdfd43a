"""CPU tests of the kernels' plain-torch references (and the torch-only helpers) against
brute force and the algorithm package. The Triton kernels themselves are checked under the
interpreter in test_kernels_interpreter.py and compiled for sm_90 in test_kernels_compile.py.

Outputs are poisoned (NaN / sentinels) before each call; every expected element must be
written and nothing else touched.
"""

from __future__ import annotations

import math

import pytest
import torch


import freekv_sglang.kernels as K  # noqa: E402

from freekv_sglang.algorithm import WorkingSetLayout, dense_attention, page_digests  # noqa: E402
from freekv_sglang.algorithm.selection import topk_pages  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16)


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def _randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


# --------------------------------------------------------------------------------------- store
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,hkv,d", [(8, 1, 64), (16, 3, 32), (32, 8, 128)])
def test_store_reference(dtype, p, hkv, d):
    g = _gen(1)
    n_pages, t = 7, 30
    host_k = _randn(g, n_pages, hkv, p, d, dtype=dtype)
    host_v = _randn(g, n_pages, hkv, p, d, dtype=dtype)
    k = _randn(g, t, hkv, d, dtype=dtype)
    v = _randn(g, t, hkv, d, dtype=dtype)
    loc = torch.randperm(n_pages * p, generator=g)[:t]
    loc[::7] = -1
    exp_k, exp_v = host_k.clone(), host_v.clone()
    for i in range(t):
        if loc[i] >= 0:
            exp_k[loc[i] // p, :, loc[i] % p] = k[i]
            exp_v[loc[i] // p, :, loc[i] % p] = v[i]
    K.store_kv_host(host_k, host_v, k, v, loc.int())  # CPU: dispatches to the reference
    assert torch.equal(host_k, exp_k) and torch.equal(host_v, exp_v)


# ------------------------------------------------------------------------------------- digests
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,hkv,d", [(8, 2, 64), (32, 3, 128)])
def test_digests_reference(dtype, p, hkv, d):
    g = _gen(2)
    r = 9 * p + 5
    src = _randn(g, r, hkv, d, dtype=dtype)
    row0 = torch.tensor([0, 3 * p, -1, 7, 8 * p])
    dst = torch.tensor([4, 0, 2, 6, 1])
    dig = torch.full((8, hkv, 2, d), float("nan"), dtype=dtype)
    K.page_digests_from_rows(src, row0, dst, dig, page_size=p)
    for m in range(len(row0)):
        pg = int(dst[m])
        if row0[m] < 0:
            continue
        rows = src[int(row0[m]): int(row0[m]) + p]
        assert torch.equal(dig[pg, :, 0], rows.amax(0)) and torch.equal(dig[pg, :, 1], rows.amin(0))
    untouched = [i for i in range(8) if i not in (4, 0, 6, 1)]
    assert dig[untouched].isnan().all()
    # equals the algorithm's page_digests on whole pages
    dig2 = torch.empty(9, hkv, 2, d, dtype=dtype)
    K.page_digests_from_rows(src, torch.arange(9) * p, torch.arange(9), dig2, page_size=p)
    assert torch.equal(dig2, page_digests(src, p))


# -------------------------------------------------------------------------------------- scores
def _score_problem(g, dtype, hkv, grp, d, p, b=3, max_ctx=None):
    max_ctx = max_ctx or 40 * p
    n_host = 64
    keys = _randn(g, n_host * p, hkv, d, dtype=dtype)
    digests = page_digests(keys, p).contiguous()
    r2t = torch.randint(0, n_host * p, (b + 2, max_ctx), generator=g, dtype=torch.int32)
    rpi = torch.randperm(b + 2, generator=g)[:b]
    n_ctx = torch.randint(1, max_ctx + 1, (b,), generator=g, dtype=torch.int32)
    n_ctx[0] = max_ctx
    q = _randn(g, b, hkv * grp, d, dtype=dtype)
    return q, digests, r2t, rpi, n_ctx


def _score_brute(q, digests, r2t, rpi, n_ctx, head_mask, max_pages, p, n_sink, n_window, agg):
    b, hq, d = q.shape
    hkv = digests.shape[1]
    grp = hq // hkv
    out = torch.full((b, hkv, max_pages), float("-inf"))
    for i in range(b):
        n_pages = math.ceil(int(n_ctx[i]) / p)
        ws = max(n_pages - n_window, n_sink)
        cands = [pg for pg in range(max_pages) if n_sink <= pg < ws]
        for h in range(hkv):
            if head_mask is not None and not head_mask[i, h]:
                continue
            if not cands:
                continue
            s = torch.empty(grp, len(cands))
            for j, pg in enumerate(cands):
                hp = int(r2t[rpi[i], pg * p]) // p
                mx, mn = digests[hp, h, 0].float(), digests[hp, h, 1].float()
                for gg in range(grp):
                    qq = q[i, h * grp + gg].float()
                    s[gg, j] = torch.maximum(qq * mx, qq * mn).sum()
            if agg == "mean":
                v = s.mean(0)
            elif agg == "max":
                v = s.amax(0)
            else:
                v = torch.softmax(s / math.sqrt(d), dim=-1).mean(0)
            out[i, h, cands] = v
    return out


@pytest.mark.parametrize("agg", ["mean", "max", "softmax-mean"])
@pytest.mark.parametrize("grp", [1, 3, 4])
def test_scores_reference(agg, grp):
    g = _gen(3)
    p, hkv, d = 8, 2, 16
    q, dig, r2t, rpi, n_ctx = _score_problem(g, torch.bfloat16, hkv, grp, d, p)
    max_pages = r2t.shape[1] // p
    hm = torch.rand(3, hkv, generator=g) < 0.7
    for mask in (None, hm):
        out = torch.full((3, hkv, max_pages), float("nan"))
        K.score_pages(q, dig, r2t, rpi, n_ctx, mask, out, page_size=p, n_sink=2, n_window=3, aggregation=agg)
        exp = _score_brute(q, dig, r2t, rpi, n_ctx, mask, max_pages, p, 2, 3, agg)
        assert not out.isnan().any()
        assert torch.equal(torch.isinf(out), torch.isinf(exp))
        fin = torch.isfinite(exp)
        torch.testing.assert_close(out[fin], exp[fin], rtol=1e-5, atol=1e-5 * exp[fin].abs().max().item())


def test_scores_candidates_match_layout():
    g = _gen(4)
    p = 8
    q, dig, r2t, rpi, n_ctx = _score_problem(g, torch.float16, 2, 2, 16, p, b=6)
    lay = WorkingSetLayout(p, 3, 4, 5)
    max_pages = r2t.shape[1] // p
    out = torch.empty(6, 2, max_pages)
    K.score_pages(q, dig, r2t, rpi, n_ctx, None, out, page_size=p, n_sink=3, n_window=5, aggregation="mean")
    cm = lay.candidate_mask(n_ctx, max_pages)
    assert torch.equal(torch.isfinite(out), cm[:, None, :].expand_as(out))


# -------------------------------------------------------------------------------------- select
def _residency_brute(resident, selected, active):
    """The documented semantics, one row, in Python."""
    k = len(resident)
    sel = [x for x in selected if x >= 0]
    res = list(resident)
    if not active:
        return res, [-1] * k, [-1] * k, 0
    missing = sorted(x for x in sel if x not in res)
    free = [j for j in range(k) if res[j] < 0 or res[j] not in sel]
    new = [x if (x >= 0 and x in sel) else -1 for x in res]
    slots, pages = [], []
    for pg, j in zip(missing, free):
        new[j] = pg
        slots.append(j)
        pages.append(pg)
    pad = [-1] * (k - len(slots))
    return new, slots + pad, pages + pad, len(slots)


@pytest.mark.parametrize("np_,k", [(40, 8), (5, 8), (64, 32), (12, 12)])
def test_select_update_reference(np_, k):
    """The runtime's selection of request rows, in place: top-k, residency and recall lists as brute force."""
    g = _gen(5)
    b, hkv = 3, 4
    s0 = torch.randn(b, hkv, np_, generator=g)
    s1 = s0 + 0.7 * torch.randn(b, hkv, np_, generator=g)
    s1[torch.rand(s1.shape, generator=g) < 0.2] = float("-inf")
    s1[0, 0] = float("-inf")
    resident = topk_pages(s0, k)
    resident = resident[..., torch.randperm(k, generator=g)]
    resident[1, 1, :2] = -1
    rows = torch.tensor([3, 1, 4])
    hm = torch.rand(b, hkv, generator=g) < 0.6
    for mask in (None, hm):
        res = torch.full((6, hkv, k), -1, dtype=torch.long)
        res[rows] = resident
        rs, rp = torch.zeros((2, b, hkv, k), dtype=torch.int32)
        count = torch.zeros((), dtype=torch.int64)
        K.select_update(s1, res, rows, mask, k, rs, rp, count)
        sel = topk_pages(s1, k)
        total = 0
        for i in range(b):
            for h in range(hkv):
                act = True if mask is None else bool(mask[i, h])
                new, slots, pages, n = _residency_brute(resident[i, h].tolist(), sel[i, h].tolist(), act)
                assert res[rows[i], h].tolist() == new
                assert rs[i, h].tolist() == slots and rp[i, h].tolist() == pages
                total += n
        assert int(count) == total and (res[[0, 2, 5]] == -1).all()


# -------------------------------------------------------------------------------------- recall
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", ["recall_gather", "recall_staged", "recall_per_page"])
def test_recall_reference(dtype, fn):
    g = _gen(7)
    p, hkv, d, n_pages, n_slots = 16, 3, 32, 9, 11
    host_k = _randn(g, n_pages, hkv, p, d, dtype=dtype)
    host_v = _randn(g, n_pages, hkv, p, d, dtype=dtype)
    ws_k = torch.full((n_slots, p, hkv, d), float("nan"), dtype=dtype)
    ws_v = torch.full((n_slots, p, hkv, d), float("nan"), dtype=dtype)
    pairs = torch.randperm(n_slots * hkv, generator=g)[:10]
    slot, head = (pairs // hkv).int(), (pairs % hkv).int()
    page = torch.randint(0, n_pages, (10,), generator=g, dtype=torch.int32)
    slot[3] = -1
    getattr(K, fn)(host_k, host_v, ws_k, ws_v, page, slot, head)
    written = torch.zeros(n_slots, hkv, dtype=torch.bool)
    for i in range(10):
        if slot[i] < 0:
            continue
        s, h, pg = int(slot[i]), int(head[i]), int(page[i])
        assert torch.equal(ws_k[s, :, h], host_k[pg, h]) and torch.equal(ws_v[s, :, h], host_v[pg, h])
        written[s, h] = True
    assert ws_k.permute(0, 2, 1, 3)[~written].isnan().all()
    assert ws_v.permute(0, 2, 1, 3)[~written].isnan().all()


def test_recall_selected_pieces():
    g = _gen(8)
    b, hkv, k, p, max_ctx = 3, 2, 5, 8, 80
    r2t = torch.randint(0, 1000, (6, max_ctx), generator=g, dtype=torch.int32)
    rpi = torch.tensor([4, 0, 2])
    slot = torch.randint(0, k, (b, hkv, k), generator=g)
    page = torch.randint(0, max_ctx // p, (b, hkv, k), generator=g)
    n_rec = torch.randint(0, k + 1, (b, hkv), generator=g)
    pos = torch.arange(k)
    slot = torch.where(pos < n_rec[..., None], slot, -1)
    page = torch.where(pos < n_rec[..., None], page, -1)
    hp, ds, hd = K.recall_selected_pieces(slot.int(), page.int(), r2t, rpi, page_size=p, slot_base=17, select_slot0=3)
    assert hp.shape == ds.shape == hd.shape == (b * hkv * k,)
    assert hp.dtype == ds.dtype == hd.dtype == torch.int32
    exp = []
    for bb in range(b):
        for h in range(hkv):
            for j in range(int(n_rec[bb, h])):
                exp.append((int(r2t[rpi[bb], page[bb, h, j] * p]) // p, int(rpi[bb]) * 17 + 3 + int(slot[bb, h, j]), h))
    got = list(zip(hp.tolist(), ds.tolist(), hd.tolist()))
    assert got[:len(exp)] == exp  # valid pieces first, in (b, h, t) order
    assert all(x == (-1, -1, -1) for x in got[len(exp):])


# ---------------------------------------------------------------------------------- page table
@pytest.mark.parametrize("lay", [WorkingSetLayout(8, 3, 4, 3), WorkingSetLayout(32, 16, 32, 16),
                                 WorkingSetLayout(16, 0, 2, 2)])
def test_page_table_reference(lay):
    g = _gen(9)
    p = lay.page_size
    seq = torch.cat([torch.tensor([1, p, p + 1, lay.slots * p, lay.slots * p + 1]),
                     torch.randint(1, 100 * p, (7,), generator=g)]).int()
    b = len(seq)
    rpi = torch.randperm(b + 3, generator=g)[:b]
    indptr = torch.full((b + 1,), -5, dtype=torch.int32)
    cap = b * lay.slots + 4
    indices = torch.full((cap,), -5, dtype=torch.int32)
    last = torch.full((b,), -5, dtype=torch.int32)
    K.build_page_table(seq, rpi, indptr, indices, last, layout=lay, slot_base=lay.slots + 2)
    assert torch.equal(indptr, K.page_table_indptr_host(seq, lay))
    assert torch.equal(last, K.last_page_len_host(seq, lay))
    for i in range(b):
        slots, lp = lay.page_table(int(seq[i]))
        got = indices[indptr[i]:indptr[i + 1]].tolist()
        assert got == [int(rpi[i]) * (lay.slots + 2) + s for s in slots]
        assert int(last[i]) == lp
        assert len(slots) <= lay.slots
    assert (indices[int(indptr[-1]):] == -5).all()


# ------------------------------------------------------------------------------- sparse decode
@pytest.mark.parametrize("q_scale", [1.0, 60.0])
def test_sparse_decode_reference(q_scale):
    """Paged attention over the working sets' page table equals dense attention over the listed tokens and a
    brute-force softmax. ``q_scale=60``: logits in the hundreds (exp overflows float32 past 88), which only a
    softmax that subtracts the maximum survives."""
    g = _gen(10)
    p, hkv, grp, d, n_slots = 4, 2, 3, 16, 12
    ws_k = _randn(g, n_slots, p, hkv, d)
    ws_v = _randn(g, n_slots, p, hkv, d)
    q = _randn(g, 2, hkv * grp, d) * q_scale
    indptr = torch.tensor([0, 3, 5], dtype=torch.int32)
    indices = torch.tensor([5, 0, 7, 2, 9], dtype=torch.int32)
    last = torch.tensor([2, 4], dtype=torch.int32)
    out = K.sparse_decode_reference(q, ws_k, ws_v, indptr, indices, last, 0.3)
    assert torch.isfinite(out).all()
    # float32 logits of magnitude L carry rounding of about 1e-7 L; the weights and outputs follow
    tol = 1e-5 * q_scale
    top = 0.0
    for b in range(2):
        sl = indices[indptr[b]:indptr[b + 1]].long()
        kk = ws_k[sl].flatten(0, 1)
        vv = ws_v[sl].flatten(0, 1)
        n = (len(sl) - 1) * p + int(last[b])
        torch.testing.assert_close(out[b], dense_attention(q[b], kk[:n], vv[:n], 0.3), rtol=tol, atol=tol)
        for h in range(hkv * grp):  # brute force: softmax by hand, shifted by the largest logit
            logits = (kk[:n, h // grp].double() @ q[b, h].double()) * 0.3
            top = max(top, float(logits.max()))
            w = torch.exp(logits - logits.max())
            want = (w / w.sum()) @ vv[:n, h // grp].double()
            torch.testing.assert_close(out[b, h].double(), want, rtol=tol, atol=tol)
    assert top > 100 if q_scale > 1 else top < 20  # the large case reaches the hundreds
