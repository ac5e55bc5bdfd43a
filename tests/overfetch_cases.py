"""The fused selection's over-fetch correction (``score_and_select(fill_resident=m)``) against its torch
reference, bit for bit. Shared by the CPU test (Triton interpreter, in a child process) and the GPU test.

Queries and digests are half-integers and odd multiples of 1/8 (scaled by a power of two), so every page
score is computed exactly by both (no rounding in the products or their sums): the kernel must then choose
exactly the reference's pages, equal scores included (with ``host_pages`` small, many logical pages share a
host page and so a score: ties, which go to the lower page)."""

from __future__ import annotations

import torch

from freekv_sglang.kernels.score_select import score_and_select, score_and_select_reference
from kernel_cases import random_req_to_token, selection_outputs


def _exact(g: torch.Generator, shape, lo: int, hi: int, unit: float) -> torch.Tensor:
    """Odd multiples of ``unit / 2`` in ``[lo, hi] * unit``: exact in fp16/bf16, never zero."""
    return (torch.randint(lo, hi, shape, generator=g).float() + 0.5) * unit


def check_score_select_fill(device, dtype, group, head_dim, *, k=6, fill=3, aggregation="mean", page=8,
                            max_pages=40, masked=True, by_row=False, q_scale=1.0, seed=0, host_pages=None, **tuning):
    """``k`` resident slots per KV head of which ``fill`` over-fetched: the kernel's resident sets, recall lists
    and count must equal :func:`score_and_select_reference`'s. ``q_scale``: a power of two (exactness);
    ``host_pages``: distinct host pages the requests' pages are drawn from (default ``4 * max_pages``)."""
    g = torch.Generator().manual_seed(seed)
    B, hkv, R = 5, 2, 7
    hq = hkv * group
    n_sink, n_window = 2, 3
    n_host = (host_pages or max_pages * 4) + 1
    mx = _exact(g, (n_host, hkv, head_dim), -3, 3, 0.25)
    mn = mx - _exact(g, (n_host, hkv, head_dim), 0, 2, 0.25).abs()
    digests = torch.stack([mx, mn], dim=2).to(dtype)
    r2t = random_req_to_token(g, R, n_host, max_pages, page)
    rows = torch.tensor([3, 1, 6, 2, 0])  # the last entry is a padding entry (row 0)
    # many candidates; fewer than k - fill; a few more than k; a few more than k - fill; padding
    cand = [max_pages - n_sink - n_window, (k - fill) // 2 + 1, k + 4, k - fill + 2, 0]
    n_ctx = torch.tensor([(n_sink + n_window + c) * page - (3 if i % 2 else 0) for i, c in enumerate(cand)])
    n_ctx[-1] = 1
    resident = torch.full((R + 1, hkv, k), -1, dtype=torch.int64)
    for b, r in enumerate(rows.tolist()[:-1]):
        for h in range(hkv):
            # resident pages among the candidates and beyond them (no longer scored), holes anywhere
            pool = torch.randperm(max(cand[b] + 6, k), generator=g)[:k] + n_sink
            pool[torch.rand(k, generator=g) < 0.2] = -1
            resident[r, h] = pool
    mask = (torch.rand(B, hkv, generator=g) > 0.3) if masked else None
    q_all = (_exact(g, (R + 1 if by_row else B, hq, head_dim), -4, 4, 0.5) * q_scale).to(dtype)
    q_index = rows if by_row else None

    dv = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = []
    for fused in (True, False):
        res, rs, rp, cnt = selection_outputs(resident, B, hkv, k, device)
        kw = dict(max_pages=max_pages, page_size=page, n_sink=n_sink, n_window=n_window, aggregation=aggregation,
                  q_index=dv(q_index), fill_resident=fill)
        args = (q_all.to(device), digests.to(device), r2t.to(device), rows.to(device), n_ctx.to(device), dv(mask),
                res, k, rs, rp, cnt[1])
        if fused:
            score_and_select(*args, **kw, **tuning)
        else:
            score_and_select_reference(*args, **kw)
        out.append([t.cpu() for t in (res, rs, rp, cnt)])
    (res, rs, rp, cnt), (res2, rs2, rp2, cnt2) = out
    real = slice(0, B - 1)
    assert torch.equal(res[1:], res2[1:]), ("resident", res[1:], res2[1:])
    assert torch.equal(rs[real], rs2[real]) and torch.equal(rp[real], rp2[real]), ("recall lists", rs, rs2, rp, rp2)
    assert torch.equal(cnt, cnt2), ("recall count", cnt, cnt2)
    # the invariants, on the kernel's result: recalled pages are never resident before, kept pages are
    act = mask if mask is not None else torch.ones(B, hkv, dtype=torch.bool)
    for b in range(B - 1):
        for h in range(hkv):
            before = set(resident[rows[b], h].tolist()) - {-1}
            n_rec = int((rp[b, h] >= 0).sum())
            assert not set(rp[b, h, :n_rec].tolist()) & before
            if act[b, h]:
                assert n_rec <= k - fill
            else:
                assert torch.equal(res[rows[b], h], resident[rows[b], h]) and n_rec == 0
    return int(cnt[1])
