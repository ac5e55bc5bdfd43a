"""Decode prologue of one layer: everything FreeKV does before selection, in one launch.

For each request ``b`` (history of ``n[b]`` tokens including the new one, request row
``rows[b]``, token slot ``loc[b]``, current working-set slot ``cur_slot[b]``) and KV head ``h``:

1. the new token's K/V goes to the host tier (HND page ``loc // P``, offset ``loc % P``) and to
   the current window page of the working set (NHD slot ``cur_slot``, offset ``(n - 1) % P``);
2. when the token completes its page (``n % P == 0``) the page's digest (channel max and min of
   its keys) is written for host page ``loc // P``;
3. the correction check: ``flags[b, h]`` = the mean over the KV head's ``G`` query heads of
   ``cos(q, q_prev[row])`` is below ``tau``, or the row has no previous query, or speculation
   is off (then every head is reselected before attention);
4. ``spec[b, h]`` = the head needs the speculative selection for the next step: it was not
   reselected now, or a page leaves the window at the next step (``n % P == 0``); otherwise the
   correction's selection already covers the next step's candidates;
5. ``q_prev[row] = q`` and ``(row, h)`` is marked as having a previous query (validity is
   kept per KV head so that each program owns what it reads and writes).

Optionally ``counters[1] += flags`` over real rows (``rows != 0``), for statistics.
The torch reference composes the algorithm's functions.
"""

from __future__ import annotations

import torch

from freekv_sglang.algorithm.correction import correction_flags
from freekv_sglang.algorithm.digests import page_digests

from .common import (FP8_STORAGE, check_gpu_tier, check_head_dim, check_page_size, check_tier_dtype, fp8_roundtrip,
                     next_pow2, tier_write_reference, tl, triton, use_triton)
from .uva import kernel_arg

if triton is not None:

    @triton.jit
    def _decode_prologue_kernel(
        q_ptr, k_ptr, v_ptr, loc_ptr, rows_ptr, n_ptr, slot_ptr,
        hk_ptr, hv_ptr, gk_ptr, gv_ptr, wk_ptr, wv_ptr, dig_ptr, qprev_ptr, qvalid_ptr, flags_ptr, spec_ptr, cnt_ptr,
        tau, n_host,
        HKV: tl.constexpr, G: tl.constexpr, GB: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
        HAS_TAU: tl.constexpr, SPECULATIVE: tl.constexpr, COUNT: tl.constexpr, TIERED: tl.constexpr,
        FP8: tl.constexpr, DIGEST: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        d = tl.arange(0, D)
        loc = tl.load(loc_ptr + b).to(tl.int64)
        row = tl.load(rows_ptr + b).to(tl.int64)
        n = tl.load(n_ptr + b).to(tl.int64)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        off = (n - 1) % PAGE
        page = loc // PAGE
        # 1. token -> host tier (HND) and current window page (NHD)
        kx = tl.load(k_ptr + (b * HKV + h) * D + d)
        vx = tl.load(v_ptr + (b * HKV + h) * D + d)
        if FP8:  # an FP8 tier stores the token saturated and rounded; the window and digest use the same values
            kq = tl.minimum(tl.maximum(kx.to(tl.float32), -448.0), 448.0).to(hk_ptr.dtype.element_ty)
            vq = tl.minimum(tl.maximum(vx.to(tl.float32), -448.0), 448.0).to(hk_ptr.dtype.element_ty)
            kx = kq.to(wk_ptr.dtype.element_ty)
            vx = vq.to(wk_ptr.dtype.element_ty)
        else:
            kq = kx
            vq = vx
        hofs = ((page * HKV + h) * PAGE + off) * D
        if TIERED:  # pages from n_host on live in the GPU tier
            to_host = page < n_host
            gofs = (((page - n_host) * HKV + h) * PAGE + off) * D
            tl.store(gk_ptr + gofs + d, kq, mask=(d >= 0) & (to_host == 0))
            tl.store(gv_ptr + gofs + d, vq, mask=(d >= 0) & (to_host == 0))
            tl.store(hk_ptr + hofs + d, kq, mask=(d >= 0) & to_host)
            tl.store(hv_ptr + hofs + d, vq, mask=(d >= 0) & to_host)
        else:
            tl.store(hk_ptr + hofs + d, kq)
            tl.store(hv_ptr + hofs + d, vq)
        wofs = ((slot * PAGE + off) * HKV + h) * D
        tl.store(wk_ptr + wofs + d, kx)
        tl.store(wv_ptr + wofs + d, vx)
        # 2. digest of a page completed by this token (rows 0..P-2 from the slot, row P-1 = kx); without
        #    DIGEST (grid codes) the caller writes the page's codes in a launch of its own
        complete = off == PAGE - 1
        if DIGEST:
            t = tl.arange(0, PAGE)
            tile = tl.load(wk_ptr + ((slot * PAGE + t[:, None]) * HKV + h) * D + d[None, :],
                           mask=complete & (t[:, None] < PAGE - 1), other=0.0)
            tile = tl.where(t[:, None] == PAGE - 1, kx[None, :], tile)
            dofs = (page * HKV + h) * 2 * D
            tl.store(dig_ptr + dofs + d, tl.max(tile, axis=0), mask=complete & (d >= 0))
            tl.store(dig_ptr + dofs + D + d, tl.min(tile, axis=0), mask=complete & (d >= 0))
        # 3. correction check against the previous query of this row
        g = tl.arange(0, GB)
        gm = g < G
        hq = h * G + g
        qofs = (b * HKV * G + hq)[:, None] * D + d[None, :]
        pofs = (row * HKV * G + hq)[:, None] * D + d[None, :]
        qt = tl.load(q_ptr + qofs, mask=gm[:, None], other=0.0)
        valid = tl.load(qvalid_ptr + row * HKV + h) != 0
        if SPECULATIVE:
            qf = qt.to(tl.float32)
            pf = tl.load(qprev_ptr + pofs, mask=gm[:, None], other=0.0).to(tl.float32)
            dot = tl.sum(qf * pf, axis=1)
            nrm = tl.sqrt(tl.sum(qf * qf, axis=1)) * tl.sqrt(tl.sum(pf * pf, axis=1))
            cos = dot / tl.maximum(nrm, 1e-12)
            mean = tl.sum(tl.where(gm, cos, 0.0), axis=0) / G
            if HAS_TAU:
                flag = (mean < tau) | (valid == 0)
            else:
                flag = valid == 0
        else:
            flag = valid | True
        tl.store(flags_ptr + b * HKV + h, flag.to(tl.int8))
        tl.store(spec_ptr + b * HKV + h, ((flag == 0) | complete).to(tl.int8))
        if COUNT:
            tl.atomic_add(cnt_ptr + 1, tl.where(row != 0, flag.to(tl.int64), 0))
        # 5. remember the query (this program owns the G query heads of KV head h)
        tl.store(qprev_ptr + pofs, qt.to(qprev_ptr.dtype.element_ty), mask=gm[:, None])
        tl.store(qvalid_ptr + row * HKV + h, 1)


def decode_prologue_reference(q, k, v, loc, rows, n, cur_slot, host_k, host_v, ws_k, ws_v, digests, q_prev,
                              q_valid, flags, spec, *, tau, speculative, counters=None, gpu_k=None,
                              gpu_v=None) -> None:
    """Plain torch (any device): same effects as :func:`decode_prologue`."""
    p = ws_k.shape[1]
    hkv = ws_k.shape[2]
    loc, rows, n, cur_slot = loc.long(), rows.long(), n.long(), cur_slot.long()
    if host_k.dtype == FP8_STORAGE:  # everything below sees the token as the FP8 tier stores it
        k, v = fp8_roundtrip(k), fp8_roundtrip(v)
    tier_write_reference(host_k, gpu_k, loc // p, slice(None), loc % p, k)
    tier_write_reference(host_v, gpu_v, loc // p, slice(None), loc % p, v)
    off = (n - 1) % p
    ws_k[cur_slot, off] = k.to(ws_k.dtype)
    ws_v[cur_slot, off] = v.to(ws_v.dtype)
    complete = off == p - 1
    if digests is not None:
        for b in torch.nonzero(complete).flatten().tolist():
            digests[loc[b] // p] = page_digests(ws_k[cur_slot[b]], p)[0]
    valid = q_valid[rows].bool()  # [B, Hkv]
    if speculative:
        ones = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
        f = correction_flags(q, q_prev[rows], ones, hkv, tau) | ~valid
    else:
        f = torch.ones((q.shape[0], hkv), dtype=torch.bool, device=q.device)
    flags.copy_(f.to(flags.dtype))
    spec.copy_((~f | complete[:, None]).to(spec.dtype))
    if counters is not None:
        counters[1] += (f & (rows != 0)[:, None]).sum()
    q_prev[rows] = q.to(q_prev.dtype)
    q_valid[rows] = True


def decode_prologue(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, loc: torch.Tensor, rows: torch.Tensor,
                    n: torch.Tensor, cur_slot: torch.Tensor, host_k: torch.Tensor, host_v: torch.Tensor,
                    ws_k: torch.Tensor, ws_v: torch.Tensor, digests: torch.Tensor, q_prev: torch.Tensor,
                    q_valid: torch.Tensor, flags: torch.Tensor, spec: torch.Tensor, *, tau: float | None,
                    speculative: bool, counters: torch.Tensor | None = None, gpu_k: torch.Tensor | None = None,
                    gpu_v: torch.Tensor | None = None, impl: str | None = None) -> None:
    """One launch for the per-layer decode prologue (see module docstring).

    Args:
        q: ``[B, Hq, D]``; k, v: ``[B, Hkv, D]`` (contiguous); loc, rows, n, cur_slot: int ``[B]``.
        host_k, host_v: ``[n_pages, Hkv, P, D]`` pinned host tier of the layer, the KV dtype or FP8 e4m3 (then
            the token is saturated to +-448 and rounded to FP8, and the window page and digest get those values).
        ws_k, ws_v: ``[n_slots, P, Hkv, D]`` working-set slots of the layer.
        digests: ``[n_pages, Hkv, 2, D]``, or ``None``: no digest is written (the grid-code runtime writes a
            completed page's codes with :func:`.grid_codes.pack_grid_codes` after this launch).
        q_prev: ``[R+1, Hq, D]``; q_valid: bool ``[R+1, Hkv]``.
        flags, spec: bool ``[B, Hkv]`` outputs.
        tau: correction threshold or ``None`` (off); speculative: speculation on.
        counters: optional int64 ``[4]``; ``counters[1]`` accumulates corrected heads of real rows.
        gpu_k, gpu_v: optional GPU tier ``[n_gpu, Hkv, P, D]`` holding pages ``n_host_pages`` and up.
    No host synchronisation; CUDA-graph capturable.
    """
    check_gpu_tier(host_k, gpu_k, gpu_v)
    if not use_triton(impl, q, ws_k):
        return decode_prologue_reference(q, k, v, loc, rows, n, cur_slot, host_k, host_v, ws_k, ws_v, digests,
                                         q_prev, q_valid, flags, spec, tau=tau, speculative=speculative,
                                         counters=counters, gpu_k=gpu_k, gpu_v=gpu_v)
    b, hq, d = q.shape
    _, p, hkv, _ = ws_k.shape
    check_head_dim(d)
    check_page_size(p)
    check_tier_dtype(host_k.dtype, ws_k.dtype)
    if b == 0:
        return
    g = hq // hkv
    for t in (q, k, v, ws_k, ws_v, digests, q_prev, flags, spec):
        if t is not None and not t.is_contiguous():
            raise ValueError("decode_prologue needs contiguous tensors")
    _decode_prologue_kernel[(b, hkv)](
        q, k, v, loc, rows, n, cur_slot, kernel_arg(host_k), kernel_arg(host_v),
        gpu_k if gpu_k is not None else ws_k, gpu_v if gpu_v is not None else ws_v, ws_k, ws_v,
        digests if digests is not None else ws_k, q_prev, q_valid.view(torch.uint8), flags.view(torch.int8),
        spec.view(torch.int8),
        counters if counters is not None else flags,
        float(tau) if tau is not None else 0.0, host_k.shape[0],
        HKV=hkv, G=g, GB=max(2, next_pow2(g)), D=d, PAGE=p, HAS_TAU=tau is not None, SPECULATIVE=speculative,
        COUNT=counters is not None, TIERED=gpu_k is not None, FP8=host_k.dtype == FP8_STORAGE,
        DIGEST=digests is not None, num_warps=4,
    )
