"""Checks of the grid-code kernels (``kernels/grid_codes.py``) against their torch references on fresh random
inputs. Shared by the CPU test (Triton interpreter, in a child process) and the GPU test.

Scores are checked twice:

* against :func:`kernel_numerics`, the kernel's own arithmetic in torch (the query side rounded as the kernel
  rounds it: to bf16 on the bf16 path, to ``scale * (hi + lo / 254)`` with int8 ``hi``/``lo`` on the int8 path;
  the rest in float32): equal up to float32 rounding (accumulation order, ``exp2``);
* against the float32 reference (``score_pages_grid_reference``), within the exact effect of that rounding: a
  logit moves by at most ``sum_d 3.5 |side_d - rounded(side_d)|`` (``side = q * step / sqrt(D)``, per query head;
  the aggregated bound is the largest of the group's).
"""

from __future__ import annotations

import math

import torch

from freekv_sglang.algorithm.grid_codes import grid_from_bounds, page_grid_codes, unpack_codes
from freekv_sglang.algorithm.scores import aggregate_gqa
from freekv_sglang.kernels.grid_codes import (LOG2E, pack_grid_codes, pack_grid_codes_reference,
                                              score_pages_grid, score_pages_grid_reference)
from freekv_sglang.kernels.scores import _candidates
from kernel_cases import check_chosen_and_recall, select_case, selection_outputs, to_head_major

LN2 = math.log(2.0)


def random_grid(g: torch.Generator, n_grids: int, hkv: int, d: int, zero_step: bool = False):
    """``(lo, step)`` float32 ``[n_grids, Hkv, D]``: ``lo`` around -2, steps in ``[0.4, 1.6)`` (a channel of
    zero step when ``zero_step``)."""
    lo = -2.0 + 0.5 * torch.randn(n_grids, hkv, d, generator=g)
    step = 0.4 + 1.2 * torch.rand(n_grids, hkv, d, generator=g)
    if zero_step:
        step[:, :, 3] = 0.0
    return lo, step


def _grid_rows(t, b, grid_index):
    return t[grid_index.long()] if grid_index is not None else t.expand(b, *t.shape[1:])


def int8_side(exact: torch.Tensor) -> torch.Tensor:
    """The int8 path's query side: per query head (last dim: channels) ``scale = max |exact| / 127`` (1 when
    zero), ``hi = round(exact / scale)``, ``lo = round(254 (exact - hi scale) / scale)`` clamped to +-127,
    returned as the float32 value ``scale * (hi + lo / 254)`` the int8 products stand for."""
    amax = exact.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    hi = torch.floor(exact * (1.0 / scale) + 0.5)
    lo = torch.floor((exact - hi * scale) * (254.0 * (1.0 / scale)) + 0.5).clamp(-127, 127)
    return (hi + lo * (1.0 / 254.0)) * scale


def kernel_numerics(q, codes, lo, step, r2t, rpi, n_ctx, head_mask, *, max_pages, page_size, n_sink, n_window,
                    aggregation, grid_index=None, int8=False):
    """The scoring kernel's arithmetic in torch: ``(scores [B, Hkv, Np], bound [B, Hkv], size [B, Hkv])``:
    ``bound`` the largest change of a logit (natural units, per KV head) that rounding the query side (to bf16,
    or with ``int8`` to :func:`int8_side`) makes; ``size`` the largest magnitude of the terms a logit sums (for
    float32 tolerances)."""
    b, hq, d = q.shape
    hkv = codes.shape[1]
    g = hq // hkv
    scale = LOG2E / math.sqrt(d)
    valid = _candidates(n_ctx, max_pages, page_size, n_sink, n_window)
    tok = r2t[rpi.long()][:, torch.arange(max_pages) * page_size].long()
    hp = torch.where(valid, tok // page_size, torch.zeros_like(tok))
    lo_b = _grid_rows(lo, b, grid_index)[:, :, None]  # [B, Hkv, 1, D]
    st_b = _grid_rows(step, b, grid_index)[:, :, None]
    qf = q.float().view(b, hkv, g, d)
    codes_f = unpack_codes(codes[hp]).float()  # [B, Np, Hkv, P, D]
    if int8:  # sum_d c side + q . lo scale + 0.5 sum(side), side = scale q step in int8 hi/lo parts
        exact = qf * st_b * scale
        side = int8_side(exact)  # [B, Hkv, G, D]
        const = (qf * lo_b).sum(-1) * scale + 0.5 * side.sum(-1)
        dot = torch.einsum("bkgd,bpktd->bkgpt", side, codes_f)
        bound = (LN2 * 3.5 * (side - exact).abs().sum(-1)).amax(-1)  # [B, Hkv]
        size = (LN2 * (3.0 * side.abs().sum(-1) + const.abs())).amax(-1)
    else:  # sum_d (1 + c/4) side' - 0.875 sum(side') + q . lo scale, side' = bf16(4 scale q step)
        exact = qf * st_b * (4.0 * scale)
        side = exact.to(torch.bfloat16).float()  # [B, Hkv, G, D]
        const = (qf * lo_b).sum(-1) * scale - 0.875 * side.sum(-1)  # [B, Hkv, G]
        dot = torch.einsum("bkgd,bpktd->bkgpt", side, 1.0 + codes_f / 4)
        bound = (LN2 * 3.5 / 4 * (side - exact).abs().sum(-1)).amax(-1)  # [B, Hkv]
        size = (LN2 * (1.75 * side.abs().sum(-1) + const.abs())).amax(-1)
    lse = torch.logsumexp(dot * LN2, -1) + LN2 * const[..., None]  # [B, Hkv, G, Np]
    out = aggregate_gqa(lse.reshape(b, hq, max_pages), hkv, aggregation, valid, head_dim=d)
    if head_mask is not None:
        out = out.masked_fill(~head_mask.bool()[:, :, None], float("-inf"))
    return out, bound, size


def check_pack(device, dtype, page, hkv, d, *, seed=0, grid_rows=1, zero_step=False):
    """``pack_grid_codes`` (Triton on ``device``) equals its reference bit for bit, from working-set slots (strided
    rows) and from a prefill's fresh keys; pages not listed keep their bytes."""
    g = torch.Generator().manual_seed(seed)
    n_slots, n_host = 9, 12
    ws = torch.randn(n_slots, page, hkv + 1, d, generator=g).to(dtype)  # one extra head: strided rows
    src = ws.view(-1, hkv + 1, d)[:, :hkv]
    row0 = torch.tensor([0, 3 * page, -1, 2 * page, 8 * page, 5 * page], dtype=torch.int32)
    dst = torch.tensor([6, 0, 3, 2, 11, 7], dtype=torch.int64)
    lo, step = random_grid(g, grid_rows, hkv, d, zero_step)
    gi = torch.randint(0, grid_rows, (row0.shape[0],), generator=g) if grid_rows > 1 else None
    base = torch.randint(0, 256, (n_host, hkv, page, d // 4), generator=g, dtype=torch.uint8)
    got, want = base.clone().to(device), base.clone()
    dv = lambda t: None if t is None else t.to(device)  # noqa: E731
    pack_grid_codes(src.to(device), row0.to(device), dst.to(device), got, lo.to(device), step.to(device),
                    page_size=page, grid_index=dv(gi))
    pack_grid_codes_reference(src, row0, dst, want, lo, step, page_size=page, grid_index=gi)
    got = got.cpu()
    assert torch.equal(got, want), "packed codes"
    listed = set(dst[row0 >= 0].tolist())
    for pg in range(n_host):
        if pg not in listed:
            assert torch.equal(got[pg], base[pg]), f"page {pg} was not listed but changed"
    # one page against the algorithm's page_grid_codes (grid of its row)
    r = 0 if gi is None else int(gi[1])
    assert torch.equal(got[0], page_grid_codes(src[3 * page: 4 * page], page, lo[r], step[r])[0])
    # prefill form: fresh keys [n, Hkv, D], whole pages from row 0, one grid fitted to them
    keys = torch.randn(5 * page + 3, hkv, d, generator=g).to(dtype)
    lo1, st1 = grid_from_bounds(keys.float().amin(0)[None], keys.float().amax(0)[None])
    out = torch.zeros(5, hkv, page, d // 4, dtype=torch.uint8, device=device)
    pack_grid_codes(keys.to(device), (torch.arange(5) * page).to(device), torch.arange(5).to(device), out,
                    lo1.to(device), st1.to(device), page_size=page)
    assert torch.equal(out.cpu(), page_grid_codes(keys, page, lo1[0], st1[0]))


def check_scores(device, dtype, group, head_dim, *, aggregation="mean", page=16, hkv=2, b=3, max_pages=50,
                 n_sink=2, n_window=3, grid_mode="one", masked=False, q_scale=1.0, head_major=False, seed=0,
                 **tuning):
    """``score_pages_grid`` (Triton on ``device``) vs :func:`kernel_numerics` (tight) and the float32 reference
    (within the bf16 bound). ``grid_mode``: ``"one"`` grid for all requests, ``"per_request"`` (``[B, Hkv, D]``,
    row ``b``), ``"index"`` (rows of a larger table picked by ``grid_index``, with strided rows)."""
    g = torch.Generator().manual_seed(seed)
    hq = hkv * group
    n_host = 3 * max_pages + 7
    codes = torch.randint(0, 256, (n_host, hkv, page, head_dim // 4), generator=g, dtype=torch.uint8)
    max_ctx = max_pages * page + 5
    r2t = torch.randint(0, n_host * page, (b + 2, max_ctx), generator=g, dtype=torch.int32)
    rpi = torch.randperm(b + 2, generator=g)[:b]
    n_ctx = torch.randint(1, max_ctx + 1, (b,), generator=g, dtype=torch.int32)
    n_ctx[0] = max_pages * page
    n_ctx[-1] = (n_sink + n_window) * page - 1  # no candidate
    qkv = (q_scale * torch.randn(b, hq + 2 * hkv, head_dim, generator=g)).to(dtype)
    q = qkv[:, :hq]  # strided rows, as after the QKV projection
    grid_index = None
    if grid_mode == "one":
        lo, step = random_grid(g, 1, hkv, head_dim)
    elif grid_mode == "per_request":
        lo, step = random_grid(g, b, hkv, head_dim)
    else:
        tlo, tst = random_grid(g, 2 * b + 1, hkv + 1, head_dim)  # a wider table: strided grid rows
        lo, step = tlo[:, 1:], tst[:, 1:]
        grid_index = torch.randperm(2 * b + 1, generator=g)[:b]
    mask = (torch.rand(b, hkv, generator=g) > 0.3) if masked else None
    kw = dict(page_size=page, n_sink=n_sink, n_window=n_window, aggregation=aggregation)

    dv = lambda t: None if t is None else t.to(device)  # noqa: E731
    cd = to_head_major(codes.to(device)) if head_major else codes.to(device)
    out = torch.full((b, hkv, max_pages), float("nan"), device=device)
    score_pages_grid(q.to(device), cd, lo.to(device), step.to(device), r2t.to(device), rpi.to(device),
                     n_ctx.to(device), dv(mask), out, grid_index=dv(grid_index), **kw, **tuning)
    out = out.cpu()
    ref = torch.empty(b, hkv, max_pages)
    score_pages_grid_reference(q, codes, lo, step, r2t, rpi, n_ctx, mask, ref, grid_index=grid_index, **kw)
    emu, bound, size = kernel_numerics(q, codes, lo, step, r2t, rpi, n_ctx, mask, max_pages=max_pages,
                                       grid_index=grid_index, int8=tuning.get("int8", True), **kw)

    assert not out.isnan().any()
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and torch.equal(torch.isinf(emu), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert fin.any() and not fin[-1].any()
    if aggregation == "softmax-mean":  # probabilities: relative errors
        torch.testing.assert_close(out[fin], emu[fin], rtol=1e-4, atol=1e-7)
        rel = math.expm1(2 * float(bound.max()) / math.sqrt(head_dim)) + 1e-4
        torch.testing.assert_close(out[fin], ref[fin], rtol=rel, atol=1e-7)
        return out, ref
    tol = 1e-5 * (size[..., None] + emu.masked_fill(~fin, 0).abs()) + 1e-5  # float32 rounding (tensor cores too)
    err = (out - emu).abs().masked_fill(~fin, 0)
    assert bool((err <= tol).all()), f"kernel vs its numerics: {float(err.max())} > {float(tol.min())}"
    err_ref = (out - ref).abs().masked_fill(~fin, 0)
    lim = bound[..., None] * 1.0001 + tol
    assert bool((err_ref <= lim).all()), f"kernel vs float32 reference: {float((err_ref - lim).max())} over the bound"
    return out, ref


def check_score_select_grid(device, dtype, group, head_dim, *, k=4, aggregation="mean", page=8, max_pages=40,
                            masked=True, by_row=False, margin=0, grid_mode="one", q_scale=1.0, head_major=False,
                            seed=0, **tuning):
    """Fused scoring + top-k + residency (``score_and_select`` with ``grid=``) vs the unfused torch reference, as
    ``kernel_cases.check_score_select`` checks the Quest path: the chosen set must be a top-``k`` (with
    ``margin``: the sticky selection) of the float32 reference scores up to the bf16 bound of
    :func:`kernel_numerics`; given that set, residency, recall lists and the recall count equal the reference's
    exactly (the chosen pages boosted in the reference scores)."""
    from freekv_sglang.kernels.score_select import score_and_select

    g = torch.Generator().manual_seed(seed)
    B, hkv, R = 5, 2, 7
    hq = hkv * group
    n_sink, n_window = 2, 3
    n_host = max_pages * 4 + 1
    codes = torch.randint(0, 256, (n_host, hkv, page, head_dim // 4), generator=g, dtype=torch.uint8)
    r2t, rows, n_ctx, resident, mask, q_all = select_case(
        g, B=B, hkv=hkv, R=R, hq=hq, k=k, max_pages=max_pages, page=page, n_sink=n_sink, n_window=n_window,
        n_host=n_host, masked=masked, by_row=by_row, head_dim=head_dim, q_scale=q_scale, dtype=dtype)
    q_index = rows if by_row else None
    q = q_all[rows] if by_row else q_all
    grid_index = None
    if grid_mode == "one":
        lo, step = random_grid(g, 1, hkv, head_dim)
    elif grid_mode == "per_request":
        lo, step = random_grid(g, B, hkv, head_dim)
    else:  # rows of a table by request row (strided rows)
        tlo, tst = random_grid(g, R + 1, hkv + 1, head_dim)
        lo, step = tlo[:, 1:], tst[:, 1:]
        grid_index = rows

    res, rs, rp, cnt = selection_outputs(resident, B, hkv, k, device)
    dv = lambda t: None if t is None else t.to(device)  # noqa: E731
    cd = to_head_major(codes.to(device)) if head_major else codes.to(device)
    score_and_select(q_all.to(device), cd, r2t.to(device), rows.to(device), n_ctx.to(device), dv(mask), res, k, rs,
                     rp, cnt[1], max_pages=max_pages, page_size=page, n_sink=n_sink, n_window=n_window,
                     aggregation=aggregation, q_index=dv(q_index), margin=margin,
                     grid=(lo.to(device), step.to(device)), grid_index=dv(grid_index), **tuning)
    res, rs, rp, cnt = res.cpu(), rs.cpu(), rp.cpu(), cnt.cpu()

    scores = torch.empty(B, hkv, max_pages)
    kw = dict(page_size=page, n_sink=n_sink, n_window=n_window, aggregation=aggregation)
    score_pages_grid_reference(q, codes, lo, step, r2t, rows, n_ctx, mask, scores, grid_index=grid_index, **kw)
    _, bound, size = kernel_numerics(q, codes, lo, step, r2t, rows, n_ctx, mask, max_pages=max_pages,
                                     grid_index=grid_index, int8=tuning.get("int8", True), **kw)
    if aggregation == "softmax-mean":  # probabilities: a relative tolerance
        top = scores.masked_fill(~torch.isfinite(scores), 0).abs().amax(-1)
        tol_bh = 2 * (torch.expm1(2 * bound / math.sqrt(head_dim)) + 1e-4) * top + 1e-7
    else:
        tol_bh = 2 * bound + 2e-5 * (size + 1)
    check_chosen_and_recall(res, rs, rp, cnt, resident, scores, rows, mask, k, margin,
                            lambda b, h, x: float(tol_bh[b, h]))
