"""Per-KV-head top-k page selection and the residency update that decides what to recall.

Each KV head keeps ``k = n_select`` selected slots. A new selection (a set of at most
``k`` candidate pages) is applied to the resident set like this:

* selected pages that are already resident stay in their slot (nothing moves);
* the *missing* pages, in ascending page order, go to the *free* slots — slots whose page
  is not selected any more (or that are empty) — in ascending slot order;
* only missing pages cross PCIe: the result lists ``(slot, page)`` pairs to recall.

Because a selection and the resident set have the same size once there are ``k`` or more
candidates, the victims are exactly the resident pages that scored lowest. While there are
fewer than ``k`` candidates every candidate is selected and, by induction, valid pages
occupy the first slots in page order; the page table relies on that.

All outputs have fixed shapes (padded with -1 plus counts) so that the same code runs
inside a CUDA graph.

*Speculative over-fetch* (:func:`overfetch_select`, ``--freekv-overfetch-tokens``): each KV head has
``k + m`` selected slots, ``k`` the budget. Speculation and the first selection take the plain top
``k + m``; a *corrected* selection (on the critical path, before attention) takes the top ``k`` and
fills the other ``m`` slots with the best-scoring resident pages outside them, so that it recalls only
pages of its top ``k``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def topk_pages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` pages of each row, as a set sorted ascending, ``-1``-padded.

    Args:
        scores: float ``[..., Np]`` aggregated scores; ``-inf`` marks non-candidates.
        k: number of pages to keep.
    Returns:
        int64 ``[..., k]``: chosen page indices ascending, then ``-1`` for missing ones
        (fewer than ``k`` finite scores, or ``Np < k``).
    Equal scores go to the lower page index (as the GPU kernels order them): a stable sort, not
    ``torch.topk``, whose order among ties is unspecified (ties are common with FP8 tiers).
    """
    np_ = scores.shape[-1]
    if np_ < k:
        pad = scores.new_full((*scores.shape[:-1], k - np_), float("-inf"))
        scores = torch.cat([scores, pad], dim=-1)
    val, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    val, idx = val[..., :k], idx[..., :k]
    idx = torch.where(torch.isfinite(val), idx, torch.full_like(idx, -1))
    # ascending page order, -1 last: sort with -1 mapped to +inf.
    big = torch.iinfo(torch.int64).max
    key = torch.where(idx < 0, torch.full_like(idx, big), idx)
    key, _ = torch.sort(key, dim=-1)
    return torch.where(key == big, torch.full_like(key, -1), key)


def sticky_scores(scores: torch.Tensor, resident: torch.Tensor, k: int, margin: int) -> torch.Tensor:
    """Scores with residency hysteresis: a resident page that ranks within the top ``k + margin`` of its
    row is kept (its score becomes the largest finite value); :func:`topk_pages` then fills the other
    slots by score.

    Fewer pages change per step (fewer recalls) at the price of attending, instead of a page ranked
    ``<= k``, a resident one ranked ``<= k + margin``. ``margin = 0`` returns ``scores`` unchanged.
    The fused selection kernel (``kernels/score_select.py``, ``MARGIN``) implements the same rule.

    Args:
        scores: float ``[..., Np]`` (``-inf`` = not a candidate); resident: int ``[..., k]`` (-1 empty).
    Returns:
        float ``[..., Np]``.
    """
    if margin <= 0:
        return scores
    _, order = torch.sort(scores, dim=-1, descending=True, stable=True)  # ties: lower page first
    top = order[..., : k + margin]  # [..., k + margin] page ids
    in_top = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, top, True)
    res = resident.long().clamp(min=0)
    keep = (resident >= 0) & torch.gather(in_top, -1, res) & torch.isfinite(torch.gather(scores, -1, res))
    kept = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
    kept = kept.scatter_add_(-1, res, keep.int()) > 0  # [..., Np]; empty slots add 0
    return torch.where(kept, torch.full_like(scores, torch.finfo(scores.dtype).max), scores)


def changed_pages(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """How many pages of selection ``cur`` ``[..., k]`` (-1 padded) are not in ``prev`` ``[..., k]``: int64 ``[...]``,
    the pages a step's selection would recall."""
    eq = (cur[..., :, None] == prev[..., None, :]) & (cur[..., :, None] >= 0)
    return ((cur >= 0) & ~eq.any(-1)).sum(-1)


def _member(pages: torch.Tensor, n_pages: int) -> torch.Tensor:
    """Bool ``[..., n_pages]``: page ``p`` is among ``pages [..., j]`` (-1 entries and pages past
    ``n_pages`` ignored)."""
    valid = (pages >= 0) & (pages < n_pages)
    idx = torch.where(valid, pages.long(), torch.zeros_like(pages, dtype=torch.long))
    hits = torch.zeros((*pages.shape[:-1], n_pages), dtype=torch.int32, device=pages.device)
    return hits.scatter_add_(-1, idx, valid.int()) > 0


def _sorted_union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Disjoint page sets ``a [..., i]`` and ``b [..., j]`` (-1 padded) as one ``[..., i + j]`` set,
    ascending, -1 last (the form of :func:`topk_pages`)."""
    both = torch.cat([a, b], dim=-1)
    big = torch.iinfo(torch.int64).max
    key, _ = torch.sort(torch.where(both < 0, torch.full_like(both, big), both), dim=-1)
    return torch.where(key == big, torch.full_like(key, -1), key)


def overfetch_select(scores: torch.Tensor, resident: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """The corrected selection under speculative over-fetch of ``m`` pages.

    The set is ``A = topk_pages(scores, k)`` plus, for the other ``m`` slots, the resident pages outside
    ``A`` with the best scores (equal scores: the lower page first, as :func:`topk_pages`). Applied with
    :func:`residency_update` to a resident set of ``k + m`` slots it recalls exactly ``A \\ resident``: no page
    outside ``A`` crosses PCIe. Resident pages that are not candidates (score ``-inf``) are not kept; with
    ``m = 0`` this is ``topk_pages(scores, k)``.

    Args:
        scores: float ``[..., Np]`` (``-inf`` = not a candidate).
        resident: int ``[..., k + m]`` page per selected slot (-1 empty).
        k: the budget (pages every corrected selection takes by score); m: over-fetched pages.
    Returns:
        int64 ``[..., k + m]``: ascending, -1 padded.
    """
    top = topk_pages(scores, k)
    if m <= 0:
        return top
    n_pages = scores.shape[-1]
    rest = _member(resident, n_pages) & ~_member(top, n_pages)
    fill = topk_pages(torch.where(rest, scores, torch.full_like(scores, float("-inf"))), m)
    return _sorted_union(top, fill)


class ResidencyUpdate(NamedTuple):
    resident: torch.Tensor  # int64 [..., k] new resident page per slot (-1 empty)
    recall_slot: torch.Tensor  # int64 [..., k] slot index to fill, -1 padded
    recall_page: torch.Tensor  # int64 [..., k] page to recall into it, -1 padded
    n_recall: torch.Tensor  # int64 [...] number of valid (slot, page) pairs


def residency_update(resident: torch.Tensor, selected: torch.Tensor,
                     head_mask: torch.Tensor | None = None) -> ResidencyUpdate:
    """Apply a new selection to the resident set of each (request, KV head).

    Args:
        resident: int ``[..., k]`` page held by each selected slot, -1 if empty.
        selected: int ``[..., k]`` new selection (ascending, -1 padded, as :func:`topk_pages`).
        head_mask: bool ``[...]``; rows where it is False are left unchanged with no recall.
    Returns:
        :class:`ResidencyUpdate`.
    """
    resident = resident.long()
    selected = selected.long()
    k = resident.shape[-1]
    sel_valid = selected >= 0
    res_valid = resident >= 0
    eq = (selected[..., :, None] == resident[..., None, :]) & sel_valid[..., :, None] & res_valid[..., None, :]
    in_res = eq.any(dim=-1)  # selected page already resident
    keep = eq.any(dim=-2)  # resident page still selected
    missing = sel_valid & ~in_res
    n_recall = missing.sum(dim=-1)

    # Stable partitions: missing pages first (ascending pages), free slots first (ascending slots).
    m_order = torch.argsort((~missing).to(torch.int8), dim=-1, stable=True)
    f_order = torch.argsort(keep.to(torch.int8), dim=-1, stable=True)
    pos = torch.arange(k, device=resident.device)
    active = pos < n_recall[..., None]
    if head_mask is not None:
        active = active & head_mask[..., None]
        n_recall = torch.where(head_mask, n_recall, torch.zeros_like(n_recall))
    recall_page = torch.where(active, torch.gather(selected, -1, m_order), torch.full_like(selected, -1))
    recall_slot = torch.where(active, f_order, torch.full_like(f_order, -1))

    new_res = torch.where(keep, resident, torch.full_like(resident, -1))
    # scatter recalled pages into their slots (inactive entries write into a dummy column)
    dst = torch.where(active, recall_slot, torch.full_like(recall_slot, k))
    padded = torch.cat([new_res, new_res.new_full((*new_res.shape[:-1], 1), -1)], dim=-1)
    padded = padded.scatter(-1, dst, torch.where(active, recall_page, torch.full_like(recall_page, -1)))
    new_res = padded[..., :k]
    if head_mask is not None:
        new_res = torch.where(head_mask[..., None], new_res, resident)
    return ResidencyUpdate(new_res, recall_slot, recall_page, n_recall)
