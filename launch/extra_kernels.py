"""Kernels kept for the kernel benchmarks and their tests only: the server does not use them.

Not installed (``launch/`` is scripts); from a checkout they are also reachable as ``freekv_sglang.kernels.<name>``
(a lazy re-export in ``kernels/__init__.py``) for the benchmark sections that import them from there.

* :func:`select_and_diff`: top-k and residency update of a score tensor of any leading shape, the unfused
  selection that the fused :func:`freekv_sglang.kernels.score_select.score_and_select` is compared with
  (``torch.topk`` plus the runtime's residency kernel, :func:`freekv_sglang.kernels.select.select_update`).
* :class:`XqaDecode`: FlashInfer's XQA kernels (TensorRT-LLM's GQA decode, SM90+) over the working sets, a
  working-set attention that the Triton split decode superseded.

XQA takes a padded block table ``[B, S]`` and the attended length of each request instead of a planned CSR
page table, so a step needs no host-side plan at all. The table is derived on the GPU from the CSR page table
that :func:`freekv_sglang.kernels.page_table.build_page_table` writes::

    count[b]          = kv_indptr[b+1] - kv_indptr[b]
    block_table[b, j] = kv_indices[kv_indptr[b] + j]            (j < count[b]; 0 beyond)
    seq_len[b]        = (count[b] - 1) * P + kv_last_page_len[b]

(slots in page-table order, the partly filled window page last, as XQA expects). Torch ops,
fixed shapes, no host synchronisation: recordable in a CUDA graph.
"""

from __future__ import annotations

import math

import torch

from freekv_sglang.algorithm.selection import ResidencyUpdate, residency_update, topk_pages
from freekv_sglang.kernels.select import select_update


def select_and_diff_reference(scores: torch.Tensor, resident: torch.Tensor, head_mask: torch.Tensor | None,
                              k: int) -> ResidencyUpdate:
    """Plain torch: ``residency_update(resident, topk_pages(scores, k), head_mask)``."""
    return residency_update(resident, topk_pages(scores, k), head_mask)


def select_and_diff(scores: torch.Tensor, resident: torch.Tensor, head_mask: torch.Tensor | None, k: int, *,
                    resident_out: torch.Tensor | None = None, impl: str | None = None) -> ResidencyUpdate:
    """Top-``k`` pages per row of ``scores`` and the residency update of ``resident``.

    Args:
        scores: float32 ``[..., Np]`` aggregated scores (``-inf`` = not a candidate).
        resident: int ``[..., k]`` page held by each selected slot (-1 empty).
        head_mask: bool ``[...]`` rows to update, or ``None`` for all.
        k: ``n_select``.
        resident_out: optional contiguous int tensor ``[..., k]`` (may be ``resident`` itself) that receives
            the new resident set; the returned ``resident`` is then it.
    Returns:
        :class:`ResidencyUpdate` ``(resident, recall_slot, recall_page, n_recall)``; int64 ``[..., k]`` (the
        resident set in the dtype of ``resident_out`` when given), ``[..., k]``, ``[..., k]``, ``[...]``.
        No host synchronisation.
    """
    lead = scores.shape[:-1]
    if resident.shape != (*lead, k):
        raise ValueError(f"resident must be {(*lead, k)}, got {tuple(resident.shape)}")
    new = resident_out if resident_out is not None else torch.empty((*lead, k), dtype=torch.int64,
                                                                     device=scores.device)
    if new.shape != (*lead, k) or not new.is_contiguous():
        raise ValueError(f"resident_out must be contiguous {(*lead, k)}")
    if new is not resident:
        new.copy_(resident)
    rows = new.numel() // k if k else 0
    lists = torch.empty((2, rows, 1, k), dtype=torch.int32, device=scores.device)
    select_update(scores.reshape(rows, 1, scores.shape[-1]), new.view(rows, 1, k),
                  torch.arange(rows, device=scores.device), None if head_mask is None else head_mask.reshape(rows, 1),
                  k, lists[0], lists[1], impl=impl)
    slot, page = lists.long().view(2, *lead, k)
    return ResidencyUpdate(new, slot, page, (slot >= 0).sum(-1))


#: XQA keeps its multi-block semaphores in the first 8 MiB of its workspace (zeroed once; the
#: kernels restore them) and uses the rest as scratch.
XQA_WORKSPACE_BYTES = 136 * 2**20
XQA_PAGE_SIZES = (16, 32, 64, 128)


def block_table_from_page_table(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor,
                                page_size: int, block_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Fill XQA's inputs from the CSR page table (in place; torch ops, no host sync).

    Args:
        kv_indptr: int32 ``[B+1]``; kv_indices: int32 ``[>= kv_indptr[B]]``; kv_last_page_len: int32 ``[B]``.
        page_size: ``P``.
        block_table: int32 ``[B, S]`` (out): each request's slots, padded with 0.
        seq_lens: int32 ``[B]`` (out): tokens attended (``S * P`` at most).
    """
    b, s = block_table.shape
    if kv_indptr.shape != (b + 1,) or kv_last_page_len.shape != (b,) or seq_lens.shape != (b,):
        raise ValueError(f"block table {tuple(block_table.shape)} does not match indptr {tuple(kv_indptr.shape)}, "
                         f"last_page_len {tuple(kv_last_page_len.shape)}, seq_lens {tuple(seq_lens.shape)}")
    start = kv_indptr[:-1].long()
    count = kv_indptr[1:].long() - start
    j = torch.arange(s, device=block_table.device)
    pos = (start[:, None] + j).clamp_(max=max(kv_indices.shape[0] - 1, 0))
    slots = kv_indices.long()[pos]
    block_table.copy_(torch.where(j < count[:, None], slots, torch.zeros_like(slots)))
    seq_lens.copy_(((count - 1).clamp(min=0) * page_size + kv_last_page_len.long()).to(seq_lens.dtype))


class XqaDecode:
    """FlashInfer's ``xqa_batch_decode_with_kv_cache`` over the working-set slots (NHD).

    Args:
        device: CUDA device (SM90 or newer).
        max_batch: largest batch; slots_per_request: ``S`` (block-table width).
    The block table and lengths live in static buffers (:attr:`block_table`, :attr:`seq_lens`)
    that :meth:`fill` writes; :meth:`run` reads the first ``B`` rows. The XQA kernel for a
    (dtype, page size, head dim, GQA group) is compiled by FlashInfer on first use.
    """

    def __init__(self, device: torch.device | str, max_batch: int, slots_per_request: int):
        self.device = torch.device(device)
        self.slots = slots_per_request
        self.workspace = torch.zeros(XQA_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.block_table = torch.zeros((max_batch, slots_per_request), dtype=torch.int32, device=self.device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=self.device)

    def fill(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor,
             page_size: int) -> None:
        """Derive rows ``[0, B)`` of the block table and lengths from a CSR page table (graph-recordable)."""
        b = kv_last_page_len.shape[0]
        if b > self.block_table.shape[0]:
            raise ValueError(f"batch {b} exceeds the XQA block table's {self.block_table.shape[0]} rows")
        block_table_from_page_table(kv_indptr, kv_indices, kv_last_page_len, page_size, self.block_table[:b],
                                    self.seq_lens[:b])

    def run(self, q: torch.Tensor, ws_k: torch.Tensor, ws_v: torch.Tensor, sm_scale: float | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """``q [B, Hq, D]`` over rows ``[0, B)`` of the filled table; ``ws_k``/``ws_v`` ``[n_slots, P, Hkv, D]``.
        Returns ``[B, Hq, D]`` in ``q``'s dtype. Capturable (no plan, no host reads)."""
        from flashinfer.decode import xqa_batch_decode_with_kv_cache

        b, _, d = q.shape
        p = ws_k.shape[1]
        if p not in XQA_PAGE_SIZES or d % 16 or not 16 <= d <= 256:
            raise ValueError(f"XQA decode supports page sizes {XQA_PAGE_SIZES} and head dims 16-256 in steps of 16, "
                             f"got page {p}, head dim {d}; use FREEKV_DECODE_ATTENTION=flashinfer")
        scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)
        return xqa_batch_decode_with_kv_cache(
            q.contiguous(), (ws_k, ws_v), self.workspace, self.block_table[:b], self.seq_lens[:b].view(torch.uint32),
            self.slots * p, bmm1_scale=scale, bmm2_scale=1.0, out=out, kv_layout="NHD")
