"""Per-KV-head top-k selection and the residency update (what to recall, into which slot).

Semantics are exactly :func:`algorithm.selection.topk_pages` followed by
:func:`algorithm.selection.residency_update` (see there): selected pages already resident
keep their slot, missing pages (ascending) go to the free slots (ascending), and only the
missing ``(slot, page)`` pairs are listed for recall. Fixed shapes, ``-1`` padding.

GPU path of :func:`select_update` (the runtime's selection over a score tensor, for the GQA
aggregations the fused :mod:`.score_select` does not cover): ``torch.topk`` (capturable, no host
sync) plus one Triton program per (request, KV head) row that sorts the chosen pages and does the
whole residency update in registers (:func:`_residency_row`, shared with the fused merge),
replacing the ~40 small torch kernels of the reference. The reference itself is also free of host
syncs and capturable.
"""

from __future__ import annotations

import torch

from freekv_sglang.algorithm.selection import overfetch_select, residency_update, topk_pages

from .common import next_pow2, tl, triton, use_triton

# The runtime's selection reads the resident set of each request's row directly (no gather/scatter),
# writes recall lists with the valid entries first and counts recalls.
if triton is not None:

    @triton.jit
    def _residency_row(fin, idx, i, inb, act, res_row, rslot_row, rpage_row, cnt_ptr, row,
                       K: tl.constexpr, COUNT: tl.constexpr):
        """Residency update of one (request, KV head) row from its top-k (``fin``: chosen,
        ``idx``: page; ``[KB]``, distinct pages). Writes the recall lists (valid first, -1
        after), the new resident set when ``act``, and counts recalls of real rows."""
        # sort the chosen pages ascending: rank = number of smaller chosen pages
        smaller = fin[None, :] & (idx[None, :] < idx[:, None])
        rank = tl.sum(smaller.to(tl.int32), axis=1)
        n_sel = tl.sum(fin.to(tl.int32), axis=0)
        hit = fin[None, :] & (rank[None, :] == i[:, None])
        sel = tl.sum(tl.where(hit, idx[None, :], 0), axis=1)
        sv = i < n_sel
        sel = tl.where(sv, sel, -1)
        res = tl.load(res_row + i, mask=inb, other=-1).to(tl.int64)
        rv = res >= 0
        eq = (sel[:, None] == res[None, :]) & sv[:, None] & rv[None, :]
        eqi = eq.to(tl.int32)
        in_res = tl.max(eqi, axis=1) > 0
        keep = tl.max(eqi, axis=0) > 0
        missing = sv & (in_res == 0)
        free = inb & (keep == 0)
        before = i[None, :] < i[:, None]
        m_rank = tl.sum((before & missing[None, :]).to(tl.int32), axis=1)
        f_rank = tl.sum((before & free[None, :]).to(tl.int32), axis=1)
        n_rec = tl.sum(missing.to(tl.int32), axis=0)
        n_rec = tl.where(act, n_rec, 0)
        # t-th recall: the missing page of rank t into the free slot of rank t
        pick_p = missing[None, :] & (m_rank[None, :] == i[:, None])
        rpage = tl.sum(tl.where(pick_p, sel[None, :], 0), axis=1)
        pick_s = free[None, :] & (f_rank[None, :] == i[:, None])
        rslot = tl.sum(tl.where(pick_s, i[None, :], 0), axis=1)
        active = i < n_rec
        tl.store(rpage_row + i, tl.where(active, rpage, -1).to(tl.int32), mask=inb)
        tl.store(rslot_row + i, tl.where(active, rslot, -1).to(tl.int32), mask=inb)
        fill = missing[None, :] & (m_rank[None, :] == f_rank[:, None])
        incoming = tl.sum(tl.where(fill, sel[None, :], 0), axis=1)
        new = tl.where(keep, res, tl.where(free & (f_rank < n_rec), incoming, -1))
        tl.store(res_row + i, new.to(res_row.dtype.element_ty), mask=inb & act)
        if COUNT:
            tl.atomic_add(cnt_ptr, tl.where(row != 0, n_rec.to(tl.int64), 0))

    @triton.jit
    def _select_update_kernel(
        val_ptr, idx_ptr, res_ptr, rows_ptr, hmask_ptr, rslot_ptr, rpage_ptr, cnt_ptr,
        HKV: tl.constexpr, K: tl.constexpr, KB: tl.constexpr, HAS_MASK: tl.constexpr, COUNT: tl.constexpr,
    ):
        # grid: (B * Hkv,). val/idx: torch.topk output [B*Hkv, K]; res: [(R+1)*Hkv, K] of the layer.
        pid = tl.program_id(0).to(tl.int64)
        b = pid // HKV
        h = pid % HKV
        row = tl.load(rows_ptr + b).to(tl.int64)
        i = tl.arange(0, KB)
        inb = i < K
        val = tl.load(val_ptr + pid * K + i, mask=inb, other=float("-inf"))
        idx = tl.load(idx_ptr + pid * K + i, mask=inb, other=-1).to(tl.int64)
        fin = inb & (val == val) & (val != float("inf")) & (val != float("-inf"))
        if HAS_MASK:
            act = tl.load(hmask_ptr + pid) != 0
        else:
            act = row >= 0
        _residency_row(fin, idx, i, inb, act, res_ptr + (row * HKV + h) * K, rslot_ptr + pid * K,
                       rpage_ptr + pid * K, cnt_ptr, row, K, COUNT)


def chosen_pages(scores: torch.Tensor, resident: torch.Tensor, k: int, fill_resident: int = 0) -> torch.Tensor:
    """The pages a selection of ``k`` slots takes: ``topk_pages(scores, k)``, or with ``fill_resident = m``
    the corrected selection under over-fetch, :func:`~freekv_sglang.algorithm.selection.overfetch_select`
    (top ``k - m`` plus the best ``m`` resident pages outside them). ``scores [..., Np]``, ``resident [..., k]``;
    returns int64 ``[..., k]``."""
    if fill_resident:
        return overfetch_select(scores, resident, k - fill_resident, fill_resident)
    return topk_pages(scores, k)


def select_update_reference(scores, resident, rows, head_mask, k, recall_slot, recall_page, counter=None,
                            fill_resident=0):
    """Plain torch :func:`select_update` (any device)."""
    rows = rows.long()
    upd = residency_update(resident[rows], chosen_pages(scores, resident[rows], k, fill_resident), head_mask)
    act = head_mask if head_mask is not None else torch.ones(upd.n_recall.shape, dtype=torch.bool,
                                                             device=scores.device)
    resident[rows] = torch.where(act[..., None], upd.resident, resident[rows])
    recall_slot.copy_(upd.recall_slot.to(recall_slot.dtype))
    recall_page.copy_(upd.recall_page.to(recall_page.dtype))
    if counter is not None:
        counter += (upd.n_recall * (rows != 0)[:, None]).sum()


def select_update(scores: torch.Tensor, resident: torch.Tensor, rows: torch.Tensor, head_mask: torch.Tensor | None,
                  k: int, recall_slot: torch.Tensor, recall_page: torch.Tensor, counter: torch.Tensor | None = None,
                  *, impl: str | None = None, fill_resident: int = 0) -> None:
    """Top-``k`` per (request, KV head) and the residency update of the request rows, in place.

    Args:
        scores: float32 ``[B, Hkv, Np]`` (``-inf`` = not a candidate).
        resident: int ``[R+1, Hkv, k]`` resident selected page per slot of every row (one layer);
            updated in place for ``rows`` (where ``head_mask``).
        rows: int ``[B]`` request rows (distinct, except padding rows which must be harmless).
        head_mask: bool ``[B, Hkv]`` rows to update, or ``None`` for all.
        recall_slot, recall_page: int32 ``[B, Hkv, k]`` outputs: the ``(slot, page)`` pairs to
            recall, valid ones first, ``-1`` after.
        counter: optional int64 scalar tensor (a view) that accumulates recalled pieces of real rows.
        fill_resident: ``m > 0``: the corrected selection under over-fetch, :func:`chosen_pages` (the top
            ``k - m``, then the best ``m`` resident pages; chosen with torch sorts here, no ``torch.topk``).
    No host synchronisation; CUDA-graph capturable.
    """
    if not 0 <= fill_resident < k:
        raise ValueError(f"fill_resident must be in [0, {k}), got {fill_resident}")
    if not use_triton(impl, scores, resident):
        return select_update_reference(scores, resident, rows, head_mask, k, recall_slot, recall_page, counter,
                                       fill_resident)
    b, hkv, np_ = scores.shape
    if b == 0:
        return
    if fill_resident:  # the chosen set as finite "scores" of its pages (the kernel orders them itself)
        idx = chosen_pages(scores, resident[rows.long()], k, fill_resident).reshape(b * hkv, k)
        val = torch.where(idx >= 0, 0.0, float("-inf")).to(torch.float32)
    else:
        s = scores.reshape(b * hkv, np_)
        if np_ < k:
            s = torch.cat([s, s.new_full((b * hkv, k - np_), float("-inf"))], dim=1)
        val, idx = torch.topk(s, k, dim=-1)
    hm = head_mask.contiguous().view(torch.uint8) if head_mask is not None else recall_slot
    kb = max(16, next_pow2(k))
    _select_update_kernel[(b * hkv,)](
        val, idx, resident, rows, hm, recall_slot, recall_page,
        counter if counter is not None else recall_slot,
        HKV=hkv, K=k, KB=kb, HAS_MASK=head_mask is not None, COUNT=counter is not None,
        num_warps=4 if kb <= 64 else 8,
    )
