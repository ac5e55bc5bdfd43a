"""Checks of the fused decode kernels (prologue, in-place selection, recall from selection lists)
against their torch references on fresh random inputs. Shared by the CPU test (Triton interpreter,
in a child process) and the GPU test.

``q_scale`` multiplies the queries (standard normal otherwise): with :data:`LARGE_Q_SCALE` the
prologue's cosine check sees query norms of about a thousand (their squares past the float16 range)
and the page scores reach the hundreds, as a trained model's outlier heads do."""

from __future__ import annotations

import torch

from freekv_sglang.kernels.decode_prologue import decode_prologue
from freekv_sglang.kernels.recall import recall_selected
from freekv_sglang.kernels.select import select_update

#: Query scale of the large-magnitude cases: attention logits q.k / sqrt(D) of standard-normal keys then have a
#: standard deviation of 64, so the largest of a few hundred tokens lie in the hundreds.
LARGE_Q_SCALE = 64.0


def _same(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 0.0):
    if a.dtype == torch.bool or not a.is_floating_point():
        assert torch.equal(a.cpu(), b.cpu()), what
    else:
        assert torch.allclose(a.float().cpu(), b.float().cpu(), atol=atol, rtol=0), what


def check_prologue(device, dtype, group, head_dim, page=8, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    B, hkv, R = 5, 2, 6
    hq = hkv * group
    n_pages, n_slots = 40, (R + 1) * 6

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype)

    state = dict(host_k=rnd(n_pages, hkv, page, head_dim), host_v=rnd(n_pages, hkv, page, head_dim),
                 ws_k=rnd(n_slots, page, hkv, head_dim), ws_v=rnd(n_slots, page, hkv, head_dim),
                 digests=rnd(n_pages, hkv, 2, head_dim), q_prev=rnd(R + 1, hq, head_dim, scale=q_scale),
                 q_valid=torch.tensor([0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)[:, None].repeat(1, hkv),
                 flags=torch.zeros(B, hkv, dtype=torch.bool), spec=torch.zeros(B, hkv, dtype=torch.bool),
                 counters=torch.zeros(4, dtype=torch.int64))
    q, k, v = rnd(B, hq, head_dim, scale=q_scale), rnd(B, hkv, head_dim), rnd(B, hkv, head_dim)
    rows = torch.tensor([2, 4, 3, 0, 0])  # two padding entries on row 0
    q[1] = state["q_prev"][4]  # unchanged query: not corrected
    # a query of about the same direction (cosine ~0.999 > every tau): kept, however large its norm
    q[0] = (state["q_prev"][2].float() * 1.5 + 0.03 * q_scale * torch.randn(hq, head_dim, generator=g)).to(dtype)
    # the two padding entries write the same padding slot: give them the same token so the
    # result does not depend on which GPU program writes last
    k[4], v[4] = k[3], v[3]
    n = torch.tensor([page + 3, 2 * page, 3 * page + 1, 1, 1])  # request 1 completes a page
    loc = torch.tensor([5 * page + 2, 8 * page - 1, 11 * page, 0, 0])
    slot = torch.tensor([13, 25, 19, 0, 0])
    for tau, spec_on in ((0.9, True), (None, True), (0.5, False)):
        outs = []
        for impl in ("triton", "torch"):
            st = {kk: vv.clone().to(device) for kk, vv in state.items()}
            decode_prologue(q.to(device), k.to(device), v.to(device), loc.to(device), rows.to(device),
                            n.to(device), slot.to(device), st["host_k"], st["host_v"], st["ws_k"], st["ws_v"],
                            st["digests"], st["q_prev"], st["q_valid"], st["flags"], st["spec"], tau=tau,
                            speculative=spec_on, counters=st["counters"], impl=impl)
            outs.append(st)
        for key in state:
            if key == "q_prev":  # padding rows are written by several programs: compare real rows only
                _same(outs[0][key][1:], outs[1][key][1:], f"{key} tau={tau}")
            elif key in ("flags", "spec"):  # ... and padding entries race on row 0's state
                _same(outs[0][key][:3], outs[1][key][:3], f"{key} tau={tau}")
            elif key == "q_valid":
                _same(outs[0][key][1:], outs[1][key][1:], f"{key} tau={tau}")
            else:
                _same(outs[0][key], outs[1][key], f"{key} tau={tau}")
        # without digests (grid2: the caller packs a completed page's codes): everything else as before
        for impl in ("triton", "torch"):
            st = {kk: vv.clone().to(device) for kk, vv in state.items()}
            decode_prologue(q.to(device), k.to(device), v.to(device), loc.to(device), rows.to(device),
                            n.to(device), slot.to(device), st["host_k"], st["host_v"], st["ws_k"], st["ws_v"],
                            None, st["q_prev"], st["q_valid"], st["flags"], st["spec"], tau=tau,
                            speculative=spec_on, counters=st["counters"], impl=impl)
            for key in ("host_k", "host_v", "ws_k", "ws_v", "counters"):
                _same(st[key], outs[1][key], f"no digests: {key} {impl} tau={tau}")
            _same(st["flags"][:3], outs[1]["flags"][:3], f"no digests: flags {impl}")
            _same(st["spec"][:3], outs[1]["spec"][:3], f"no digests: spec {impl}")
        # with a GPU tier holding pages from 8 on (request 2's token lands there): the tiers together
        # hold what the single host tier held
        for impl in ("triton", "torch"):
            st = {kk: vv.clone().to(device) for kk, vv in state.items()}
            hk, hv = state["host_k"][:8].clone(), state["host_v"][:8].clone()  # host tier stays on the CPU
            if device != "cpu":
                hk, hv = hk.pin_memory(), hv.pin_memory()
            gk, gv = st["host_k"][8:].clone(), st["host_v"][8:].clone()
            decode_prologue(q.to(device), k.to(device), v.to(device), loc.to(device), rows.to(device),
                            n.to(device), slot.to(device), hk, hv, st["ws_k"], st["ws_v"],
                            st["digests"], st["q_prev"], st["q_valid"], st["flags"], st["spec"], tau=tau,
                            speculative=spec_on, counters=st["counters"], gpu_k=gk, gpu_v=gv, impl=impl)
            if device == "cuda":
                torch.cuda.synchronize()
            _same(torch.cat([hk, gk.cpu()]), outs[1]["host_k"], f"tiered host_k {impl} tau={tau}")
            _same(torch.cat([hv, gv.cpu()]), outs[1]["host_v"], f"tiered host_v {impl} tau={tau}")
            _same(st["ws_k"], outs[1]["ws_k"], f"tiered ws_k {impl}")
            _same(st["digests"], outs[1]["digests"], f"tiered digests {impl}")
        # with an FP8 host tier: the Triton kernel and the reference store the same bytes and see the same
        # (rounded) token in the window and digests
        fp8 = []
        k40, v8 = 40 * k, v  # 40 * k saturates some entries
        if device == "cpu":  # Triton's CPU interpreter rounds to FP8 unlike torch: feed exact values
            def exact(x):
                y = x.float().to(torch.float8_e4m3fn).float()
                return torch.where(y.abs() < 2.0 ** -6, torch.zeros_like(y), y).to(x.dtype)

            k40, v8 = exact(k40), exact(v)
        for impl in ("triton", "torch"):
            st = {kk: vv.clone().to(device) for kk, vv in state.items()}
            hk = state["host_k"].to(torch.float8_e4m3fn)
            hv = state["host_v"].to(torch.float8_e4m3fn)
            if device != "cpu":
                hk, hv = hk.pin_memory(), hv.pin_memory()
            decode_prologue(q.to(device), k40.to(device), v8.to(device), loc.to(device), rows.to(device),
                            n.to(device), slot.to(device), hk, hv, st["ws_k"], st["ws_v"],
                            st["digests"], st["q_prev"], st["q_valid"], st["flags"], st["spec"], tau=tau,
                            speculative=spec_on, counters=st["counters"], impl=impl)
            if device == "cuda":
                torch.cuda.synchronize()
            fp8.append((hk.view(torch.uint8).clone(), hv.view(torch.uint8).clone(), st["ws_k"].cpu(), st["ws_v"].cpu(),
                        st["digests"].cpu()))
        for a, b, what in zip(fp8[0], fp8[1], ("fp8 host_k bytes", "fp8 host_v bytes", "fp8 ws_k", "fp8 ws_v",
                                               "fp8 digests")):
            _same(a, b, f"{what} tau={tau}")
        flags = outs[1]["flags"].cpu()
        if spec_on:
            assert not bool(flags[1].any())  # same query as before: trusted
            assert not bool(flags[0].any())  # nearly the same direction, another norm: trusted
            assert bool(flags[2].all())  # row 3 has no previous query
        else:
            assert bool(flags.all())


def check_select_recall(device, dtype, head_dim, page=8, k=4, seed=0, num_programs=None, num_warps=None):
    g = torch.Generator().manual_seed(seed)
    B, hkv, R, ns = 4, 3, 6, 2
    S = ns + k + 4
    Np = max(20, 2 * k + ns)
    scores = torch.randn(B, hkv, Np, generator=g)
    scores[:, :, :ns] = float("-inf")
    scores[3, :, 5:] = float("-inf")  # few candidates
    resident = torch.full((R + 1, hkv, k), -1, dtype=torch.int64)
    resident[4] = torch.stack([torch.randperm(Np - ns, generator=g)[:k] + ns for _ in range(hkv)])
    rows = torch.tensor([2, 4, 3, 1])
    mask = torch.rand(B, hkv, generator=g) > 0.3
    outs = []
    for impl in ("triton", "torch"):
        res = resident.clone().to(device)
        rs = torch.full((B, hkv, k), 7, dtype=torch.int32, device=device)
        rp = rs.clone()
        cnt = torch.zeros(4, dtype=torch.int64, device=device)
        select_update(scores.to(device), res, rows.to(device), mask.to(device), k, rs, rp, cnt[2], impl=impl)
        outs.append((res, rs, rp, cnt))
    for name, a, b in zip(("resident", "slot", "page", "count"), outs[0], outs[1]):
        _same(a, b, name)
    # recall of those lists
    n_host = 60
    host_k = torch.randn(n_host, hkv, page, head_dim, generator=g).to(dtype)
    host_v = torch.randn(n_host, hkv, page, head_dim, generator=g).to(dtype)
    if device != "cpu":
        host_k, host_v = host_k.pin_memory(), host_v.pin_memory()
    perm = torch.randperm(n_host - 1, generator=g) + 1
    r2t = torch.zeros((R + 1, Np * page + 3), dtype=torch.int32)
    for r in range(1, R + 1):
        pages = perm[torch.randint(0, n_host - 1, (Np + 1,), generator=g)]
        r2t[r] = (pages[:, None] * page + torch.arange(page)).flatten()[: r2t.shape[1]].int()
    ws = []
    for impl in ("triton", "torch"):
        wk = torch.full(((R + 1) * S, page, hkv, head_dim), float("nan"), dtype=dtype, device=device)
        wv = wk.clone()
        recall_selected(host_k, host_v, wk, wv, outs[1][1], outs[1][2], r2t.to(device), rows.to(device),
                        page_size=page, slot_base=S, select_slot0=ns, num_programs=num_programs,
                        num_warps=num_warps if impl == "triton" else None, impl=impl)
        ws.append((wk, wv))
    for a, b in zip(ws[0], ws[1]):
        assert torch.equal(torch.nan_to_num(a, nan=-7.0).cpu(), torch.nan_to_num(b, nan=-7.0).cpu()), "recall"
    assert int(outs[1][3][2]) > 0
    # the same pages split over a host tier (pages < 30) and a GPU tier (pages >= 30)
    split = 30
    hk, hv = host_k[:split].clone(), host_v[:split].clone()
    if device != "cpu":
        hk, hv = hk.pin_memory(), hv.pin_memory()
    gk, gv = host_k[split:].to(device), host_v[split:].to(device)
    for impl in ("triton", "torch"):
        wk = torch.full(((R + 1) * S, page, hkv, head_dim), float("nan"), dtype=dtype, device=device)
        wv = wk.clone()
        recall_selected(hk, hv, wk, wv, outs[1][1], outs[1][2], r2t.to(device), rows.to(device),
                        page_size=page, slot_base=S, select_slot0=ns, num_programs=num_programs,
                        num_warps=num_warps if impl == "triton" else None, gpu_k=gk, gpu_v=gv, impl=impl)
        for a, b in zip((wk, wv), ws[1]):
            assert torch.equal(torch.nan_to_num(a, nan=-7.0).cpu(), torch.nan_to_num(b, nan=-7.0).cpu()), \
                f"tiered recall {impl}"
    # FP8 tiers: the recall widens into the working set; the values are FP8-exact, so the result equals
    # the recall of the same values stored in the working set's dtype (normal FP8 values only: Triton's CPU
    # interpreter flushes FP8 subnormals)
    def fp8_exact(x):
        y = x.float().to(torch.float8_e4m3fn).float()
        return torch.where(y.abs() < 2.0 ** -6, torch.zeros_like(y), y)

    ek, ev = fp8_exact(host_k), fp8_exact(host_v)
    want = []
    for src_k, src_v in ((ek.to(dtype), ev.to(dtype)), (ek.to(torch.float8_e4m3fn), ev.to(torch.float8_e4m3fn))):
        hk, hv = src_k[:split].clone(), src_v[:split].clone()
        if device != "cpu":
            hk, hv = hk.pin_memory(), hv.pin_memory()
        gk, gv = src_k[split:].to(device), src_v[split:].to(device)
        wk = torch.full(((R + 1) * S, page, hkv, head_dim), float("nan"), dtype=dtype, device=device)
        wv = wk.clone()
        recall_selected(hk, hv, wk, wv, outs[1][1], outs[1][2], r2t.to(device), rows.to(device), page_size=page,
                        slot_base=S, select_slot0=ns, num_programs=num_programs, num_warps=num_warps,
                        gpu_k=gk, gpu_v=gv, impl="triton")
        want.append((wk, wv))
    for a, b in zip(*want):
        assert torch.equal(torch.nan_to_num(a, nan=-7.0).cpu(), torch.nan_to_num(b, nan=-7.0).cpu()), "fp8 recall"


def random_req_to_token(g: torch.Generator, R: int, n_host: int, max_pages: int, page: int) -> torch.Tensor:
    """``[R + 1, max_pages * page + 5]`` int32 token table: rows 1..R map their pages to random host pages
    ``1..n_host - 1`` (row 0, the padding row, all zeros)."""
    max_ctx = max_pages * page + 5
    r2t = torch.zeros((R + 1, max_ctx), dtype=torch.int32)
    for r in range(1, R + 1):
        pages = torch.randint(1, n_host, (max_ctx // page + 1,), generator=g)
        r2t[r] = (pages[:, None] * page + torch.arange(page)).flatten()[:max_ctx].int()
    return r2t


def select_case(g: torch.Generator, *, B, hkv, R, hq, k, max_pages, page, n_sink, n_window, n_host, masked,
                by_row, head_dim, q_scale, dtype):
    """The batch of the fused selection checks, drawn from ``g``: ``(r2t, rows, n_ctx, resident, mask, q_all)``,
    ``rows`` ending with a padding entry (row 0), rows 1, 3, 6 with ``k`` resident pages each."""
    r2t = random_req_to_token(g, R, n_host, max_pages, page)
    rows = torch.tensor([3, 1, 6, 2, 0])  # the last entry is a padding entry (row 0)
    n_ctx = torch.tensor([max_pages * page, (n_sink + n_window + k // 2) * page - 3, 17 * page + 5,
                          (n_sink + n_window + k + 4) * page, 1])
    resident = torch.full((R + 1, hkv, k), -1, dtype=torch.int64)
    for r in (1, 3, 6):
        for h in range(hkv):
            resident[r, h] = torch.randperm(k + 8, generator=g)[:k] + n_sink
    mask = (torch.rand(B, hkv, generator=g) > 0.3) if masked else None
    q_all = (torch.randn(R + 1 if by_row else B, hq, head_dim, generator=g) * q_scale).to(dtype)
    return r2t, rows, n_ctx, resident, mask, q_all


def selection_outputs(resident: torch.Tensor, B: int, hkv: int, k: int, device):
    """``(res, rs, rp, cnt)`` on ``device`` for a ``score_and_select`` call: a copy of ``resident``, recall slots
    and pages filled with 7, a zero recall count of 4 entries."""
    res = resident.clone().to(device)
    rs = torch.full((B, hkv, k), 7, dtype=torch.int32, device=device)
    rp = rs.clone()
    cnt = torch.zeros(4, dtype=torch.int64, device=device)
    return res, rs, rp, cnt


def to_head_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[pages, Hkv, ...]`` stored head-major (``[Hkv, pages, ...]`` seen through strides)."""
    t = t.transpose(0, 1).contiguous().transpose(0, 1)
    assert not t.is_contiguous()
    return t


def check_chosen_and_recall(res, rs, rp, cnt, resident, scores, rows, mask, k, margin, tol):
    """The kernel's selection (``res``, recall lists ``rs``/``rp``, count ``cnt``, on the CPU) against the
    reference ``scores`` ``[B, Hkv, max_pages]``: each chosen set a top-``k`` (with ``margin``: the sticky
    selection) up to ``tol(b, h, score)``; given those sets, residency, recall lists and count equal
    ``select_update_reference``'s exactly (the chosen pages boosted in the reference scores). The last entry
    is padding (row 0) and not checked."""
    from freekv_sglang.algorithm.selection import sticky_scores, topk_pages
    from freekv_sglang.kernels.select import select_update_reference

    B, hkv = scores.shape[:2]
    act = mask if mask is not None else torch.ones(B, hkv, dtype=torch.bool)
    boosted = scores.clone()
    for b in range(B - 1):  # real entries (row 0 is padding, its state is not checked)
        for h in range(hkv):
            if not act[b, h]:
                assert torch.equal(res[rows[b], h], resident[rows[b], h]), "unselected head changed"
                continue
            chosen = res[rows[b], h]
            chosen = chosen[chosen >= 0]
            s = scores[b, h]
            fin = torch.isfinite(s)
            assert len(chosen) == min(k, int(fin.sum())), (b, h, chosen, int(fin.sum()))
            assert bool(fin[chosen].all()), "a non-candidate page was chosen"
            if margin:
                want = topk_pages(sticky_scores(s, resident[rows[b], h], k, margin), k)
                diff = set(chosen.tolist()) ^ set(want[want >= 0].tolist())
                # the kernel's scores may differ in the last bits: a page may only swap with one of (nearly)
                # equal score, at the top-k or the top-(k + margin) boundary
                km = torch.sort(s[fin], descending=True).values[min(k + margin, int(fin.sum())) - 1]
                for p_ in diff:
                    others = [float(s[q]) for q in diff if q != p_] + [float(km)]
                    gap = min(abs(float(s[p_]) - o) for o in others)
                    assert gap <= tol(b, h, float(s[p_])), (b, h, chosen, want, p_)
            elif len(chosen):
                kth = torch.topk(s[fin], len(chosen)).values[-1]
                assert float(s[chosen].min()) >= float(kth) - tol(b, h, float(kth)), "not a top-k"
            boosted[b, h, chosen] += 1e6
    ref = resident.clone()
    rs2 = torch.full((B, hkv, k), 7, dtype=torch.int32)
    rp2 = rs2.clone()
    cnt2 = torch.zeros(4, dtype=torch.int64)
    real = slice(0, B - 1)
    select_update_reference(boosted[real], ref, rows[real], None if mask is None else mask[real], k, rs2[real],
                            rp2[real], cnt2[1])
    _same(res[1:], ref[1:], "resident")
    _same(rs[real], rs2[real], "recall slots")
    _same(rp[real], rp2[real], "recall pages")
    _same(cnt, cnt2, "recall count")


def check_score_select(device, dtype, group, head_dim, *, k=4, aggregation="mean", page=8, max_pages=40,
                       masked=True, by_row=False, seed=0, margin=0, head_major=False, q_scale=1.0, **tuning):
    """Fused scoring + top-k + residency update vs the unfused torch reference. With ``margin`` (residency
    hysteresis) the chosen set must be exactly the reference's sticky selection.

    The kernel's scores may differ from the reference in the last bits, which can swap two
    pages of nearly equal score at the top-k boundary. So: (1) the kernel's chosen set must be
    a top-k of the reference scores up to a tolerance, and (2) given that set, residency and
    recall lists must equal the reference's exactly (checked by boosting the chosen pages in
    the reference scores, which makes the reference choose the same set). ``head_major``: the kernel reads
    the digests from a head-major buffer (``[Hkv, pages, 2, D]`` seen through strides)."""
    from freekv_sglang.kernels.score_select import score_and_select
    from freekv_sglang.kernels.scores import score_pages_reference

    g = torch.Generator().manual_seed(seed)
    B, hkv, R = 5, 2, 7
    hq = hkv * group
    n_sink, n_window = 2, 3
    n_host = max_pages * 4 + 1
    mx = torch.randn(n_host, hkv, head_dim, generator=g)
    mn = mx - torch.rand(n_host, hkv, head_dim, generator=g) * 2
    digests = torch.stack([mx, mn], dim=2).to(dtype)
    r2t, rows, n_ctx, resident, mask, q_all = select_case(
        g, B=B, hkv=hkv, R=R, hq=hq, k=k, max_pages=max_pages, page=page, n_sink=n_sink, n_window=n_window,
        n_host=n_host, masked=masked, by_row=by_row, head_dim=head_dim, q_scale=q_scale, dtype=dtype)
    q_index = rows if by_row else None
    q = q_all[rows] if by_row else q_all

    res, rs, rp, cnt = selection_outputs(resident, B, hkv, k, device)
    dv = lambda t: None if t is None else t.to(device)  # noqa: E731
    dig = to_head_major(digests.to(device)) if head_major else digests.to(device)
    score_and_select(q_all.to(device), dig, r2t.to(device), rows.to(device), n_ctx.to(device),
                     dv(mask), res, k, rs, rp, cnt[1], max_pages=max_pages, page_size=page, n_sink=n_sink,
                     n_window=n_window, aggregation=aggregation, q_index=dv(q_index), margin=margin, **tuning)
    res, rs, rp, cnt = res.cpu(), rs.cpu(), rp.cpu(), cnt.cpu()

    scores = torch.empty(B, hkv, max_pages)
    score_pages_reference(q, digests, r2t, rows, n_ctx, mask, scores, page_size=page, n_sink=n_sink,
                          n_window=n_window, aggregation=aggregation)
    check_chosen_and_recall(res, rs, rp, cnt, resident, scores, rows, mask, k, margin,
                            lambda b, h, x: 1e-3 * (1 + abs(x)))
