"""FlashInfer page table of the working sets: slot lists in ``WorkingSetLayout.page_table`` order.

Request ``b`` with ``n = seq_lens[b]`` tokens of history (the token being decoded included)
attends over its sink pages, its first ``n_selected(n)`` selected slots and its window
slots (current page last); its slots are offset by ``req_pool_idx[b] * slot_base`` (row
``r`` of the working set owns slots ``[r * slot_base, (r+1) * slot_base)``)::

    kv_indptr[b+1] - kv_indptr[b] = n_sink_pages(n) + n_selected(n) + n_window_pages(n)
    kv_indices[kv_indptr[b] + j]  = req_pool_idx[b] * slot_base + page_table(n)[0][j]
    kv_last_page_len[b]           = last_page_len(n)

One Triton program per request computes everything (its indptr offset too, by summing the
counts of the requests before it), so the GPU path is one launch, fixed shapes, no host
sync. FlashInfer's ``plan`` needs the indptr on the host as well:
:func:`page_table_indptr_host` computes it from the host's copy of the sequence lengths.
Requires ``seq_lens >= 1``.
"""

from __future__ import annotations

import torch

from freekv_sglang.algorithm.layout import WorkingSetLayout

from .common import next_pow2, tl, triton, use_triton

if triton is not None:

    @triton.jit
    def _page_table_kernel(
        seq_ptr, rpi_ptr, indptr_ptr, indices_ptr, last_ptr,
        B, slot_base, n_sink, n_select, n_window,
        PAGE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        b = tl.program_id(0)
        # offset of this request: sum of the counts of requests [0, b)
        bb = tl.arange(0, BLOCK_B)
        nb = tl.load(seq_ptr + bb, mask=bb < b, other=0).to(tl.int64)
        np_b = (nb + PAGE - 1) // PAGE
        ws_b = tl.maximum(np_b - n_window, n_sink)
        cnt_b = (tl.minimum(np_b, n_sink) + tl.minimum(tl.maximum(ws_b - n_sink, 0), n_select)
                 + tl.maximum(np_b - ws_b, 0))
        start = tl.sum(tl.where(bb < b, cnt_b, 0), axis=0)
        # this request
        n = tl.load(seq_ptr + b).to(tl.int64)
        n_pages = (n + PAGE - 1) // PAGE
        ns = tl.minimum(n_pages, n_sink)
        ws = tl.maximum(n_pages - n_window, n_sink)
        nsel = tl.minimum(tl.maximum(ws - n_sink, 0), n_select)
        nwin = tl.maximum(n_pages - ws, 0)
        count = ns + nsel + nwin
        r = tl.load(rpi_ptr + b).to(tl.int64)
        j = tl.arange(0, BLOCK_S).to(tl.int64)
        win_page = ws + (j - ns - nsel)
        slot = tl.where(j < ns, j,
                        tl.where(j < ns + nsel, n_sink + (j - ns), n_sink + n_select + win_page % n_window))
        tl.store(indices_ptr + start + j, (r * slot_base + slot).to(tl.int32), mask=j < count)
        tl.store(indptr_ptr + b + 1, (start + count).to(tl.int32))
        tl.store(last_ptr + b, (n - (n_pages - 1) * PAGE).to(tl.int32))
        if b == 0:
            tl.store(indptr_ptr, 0)


def _counts(seq_lens: torch.Tensor, layout: WorkingSetLayout) -> torch.Tensor:
    n = seq_lens.long()
    return layout.n_sink_pages(n) + layout.n_selected(n) + layout.n_window_pages(n)


def page_table_indptr_host(seq_lens_cpu: torch.Tensor, layout: WorkingSetLayout) -> torch.Tensor:
    """int32 ``[B+1]`` CPU indptr of :func:`build_page_table` from CPU sequence lengths."""
    counts = _counts(seq_lens_cpu.cpu(), layout)
    out = torch.zeros(counts.shape[0] + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return out


def last_page_len_host(seq_lens_cpu: torch.Tensor, layout: WorkingSetLayout) -> torch.Tensor:
    """int32 ``[B]`` CPU ``kv_last_page_len`` of :func:`build_page_table`."""
    return layout.last_page_len(seq_lens_cpu.cpu().long()).to(torch.int32)


def build_page_table_reference(seq_lens, req_pool_idx, kv_indptr, kv_indices, kv_last_page_len, *,
                               layout: WorkingSetLayout, slot_base: int) -> None:
    """Plain-torch/Python :func:`build_page_table` from ``layout.page_table`` (host loop; any device)."""
    ptr = 0
    ptrs = [0]
    lasts = []
    for n, r in zip(seq_lens.tolist(), req_pool_idx.tolist()):
        slots, last = layout.page_table(n)
        kv_indices[ptr:ptr + len(slots)] = torch.tensor([r * slot_base + s for s in slots], dtype=kv_indices.dtype)
        ptr += len(slots)
        ptrs.append(ptr)
        lasts.append(last)
    kv_indptr.copy_(torch.tensor(ptrs, dtype=kv_indptr.dtype))
    kv_last_page_len.copy_(torch.tensor(lasts, dtype=kv_last_page_len.dtype))


def build_page_table(seq_lens: torch.Tensor, req_pool_idx: torch.Tensor, kv_indptr: torch.Tensor,
                     kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor, *, layout: WorkingSetLayout,
                     slot_base: int, impl: str | None = None) -> None:
    """Fill FlashInfer's paged-KV metadata for the working sets (in place, no host sync).

    Args:
        seq_lens: int ``[B]`` history length incl. the token being decoded (``>= 1``).
        req_pool_idx: int ``[B]`` working-set row of each request.
        kv_indptr: int32 ``[B+1]`` (out).
        kv_indices: int32 ``[>= B * layout.slots]`` (out; entries past ``kv_indptr[B]`` untouched).
        kv_last_page_len: int32 ``[B]`` (out).
        layout: the :class:`WorkingSetLayout`; slot_base: slots per working-set row.
    """
    if not use_triton(impl, seq_lens, kv_indices):
        return build_page_table_reference(seq_lens, req_pool_idx, kv_indptr, kv_indices, kv_last_page_len,
                                          layout=layout, slot_base=slot_base)
    b = seq_lens.shape[0]
    if req_pool_idx.shape != (b,) or kv_indptr.shape != (b + 1,) or kv_last_page_len.shape != (b,):
        raise ValueError("seq_lens, req_pool_idx, kv_last_page_len must be [B] and kv_indptr [B+1]")
    if kv_indices.shape[0] < b * layout.slots:
        raise ValueError(f"kv_indices holds {kv_indices.shape[0]} < B * slots = {b * layout.slots}")
    for t in (kv_indptr, kv_indices, kv_last_page_len):
        if t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError("kv_indptr, kv_indices, kv_last_page_len must be contiguous int32")
    if b == 0:
        kv_indptr.zero_()
        return
    _page_table_kernel[(b,)](
        seq_lens, req_pool_idx, kv_indptr, kv_indices, kv_last_page_len,
        b, slot_base, layout.n_sink, layout.n_select, layout.n_window,
        PAGE=layout.page_size, BLOCK_B=next_pow2(b), BLOCK_S=next_pow2(layout.slots), num_warps=1,
    )
