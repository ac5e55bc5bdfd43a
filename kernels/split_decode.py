"""Decode attention over the working sets in Triton, split along each request's pages.

An alternative to :class:`.sparse_decode.SparseDecode` (FlashInfer) for the small, fixed-size working
sets of FreeKV: every request attends over at most ``S`` slots (sink, selected, window) of ``P``
tokens, so a batch of ``B`` requests offers only ``B * Hkv`` (request, KV head) pairs of work, too
few to keep every SM reading at batch 8. This kernel splits each pair's slot list into ``n_split``
equal chunks, one program each (flash-decoding), and a second kernel merges the chunks' partial
results by their log-sum-exp.

Math, per request ``b``, KV head ``h`` and query head ``q`` of its group (``G = Hq / Hkv``)::

    s_t = scale * <q, k_t>           over the attended tokens t of b's slots (all of a slot's P
                                     tokens, the last slot's first kv_last_page_len[b])
    chunk c: m_c = max_t s_t, l_c = sum_t exp(s_t - m_c), o_c = sum_t exp(s_t - m_c) v_t / l_c
    out = sum_c w_c o_c / sum_c w_c,  w_c = l_c exp(m_c - max_c m_c)

which is :func:`freekv_sglang.algorithm.attention.paged_attention` (the reference) split and merged.

Inputs are the CSR page table that :func:`.page_table.build_page_table` writes (``kv_indptr``,
``kv_indices``, ``kv_last_page_len``, int32 on the GPU) and NHD working sets ``[n_slots, P, Hkv, D]``.
No host-side plan and no host synchronisation: the grid depends only on ``B`` and ``S``, so a
step is recordable in a CUDA graph. Needs ``P >= 16`` and a power-of-two head dim ``>= 16``
(``tl.dot`` tiles); the group is padded to 16 query rows.
"""

from __future__ import annotations

import math

import torch

from .common import check_head_dim, check_page_size, interpreter_forced, next_pow2, sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton use the reference
    triton = None

if triton is not None:

    @triton.jit
    def _split_decode_kernel(
        q_ptr, k_ptr, v_ptr, indptr_ptr, indices_ptr, lpl_ptr, po_ptr, plse_ptr, qk_scale, stride_qb, stride_qh,
        HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
        N_SPLIT: tl.constexpr, PER_SPLIT: tl.constexpr, PAGES: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        # DOT_F32: float32 dots (Triton's CPU interpreter computes bf16 dots wrongly); False on GPUs.
        # program (b, h, c): chunk c (PER_SPLIT slots, a multiple of PAGES) of request b's slot list for
        # KV head h, all G query heads; PAGES slots per iteration (a block of PAGES * PAGE tokens).
        # qk_scale = softmax scale * log2(e): scores in base 2 (exp2).
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        c = tl.program_id(2)
        g = tl.arange(0, G_PAD)
        tb = tl.arange(0, PAGES * PAGE)
        pg = tb // PAGE  # slot of the block each token row belongs to
        t = tb % PAGE  # token within its slot
        d = tl.arange(0, D)
        gm = g < G
        start = tl.load(indptr_ptr + b).to(tl.int64)
        n = tl.load(indptr_ptr + b + 1).to(tl.int64) - start
        last = tl.load(lpl_ptr + b)
        q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :], mask=gm[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for i in range(PER_SPLIT // PAGES):
            j = c * PER_SPLIT + i * PAGES + pg  # [PAGES * PAGE] position in the request's slot list
            live = j < n
            slot = tl.load(indices_ptr + start + j, mask=live, other=0).to(tl.int64)
            n_tok = tl.where(j == n - 1, last, PAGE)
            tok = live & (t < n_tok)
            offs = ((slot * PAGE + t) * HKV + h)[:, None] * D + d[None, :]
            k = tl.load(k_ptr + offs, mask=tok[:, None], other=0.0)
            v = tl.load(v_ptr + offs, mask=tok[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # [G_PAD, PAGES * PAGE]
            s = tl.where(tok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no token yet: keep the sums at 0
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        # partial result of this chunk: normalised output and log2-sum-exp (-inf: no tokens)
        row = (b * (HKV * G) + h * G + g) * N_SPLIT + c
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        o = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(po_ptr + row[:, None] * D + d[None, :], o, mask=gm[:, None])
        tl.store(plse_ptr + row, lse, mask=gm)

    @triton.jit
    def _merge_kernel(po_ptr, plse_ptr, out_ptr, stride_ob, stride_oh,
                      HQ: tl.constexpr, D: tl.constexpr, N_SPLIT: tl.constexpr, SPLIT_PAD: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        hq = tl.program_id(1).to(tl.int64)
        c = tl.arange(0, SPLIT_PAD)
        d = tl.arange(0, D)
        row = (b * HQ + hq) * N_SPLIT + c
        cm = c < N_SPLIT
        lse = tl.load(plse_ptr + row, mask=cm, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - m))
        o = tl.load(po_ptr + row[:, None] * D + d[None, :], mask=cm[:, None], other=0.0)
        res = tl.sum(o * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
        tl.store(out_ptr + b * stride_ob + hq * stride_oh + d, res.to(out_ptr.dtype.element_ty))


def default_split(batch: int, n_kv_heads: int, slots: int, device: torch.device) -> int:
    """Chunks per (request, KV head): a power of two giving about four programs per SM, at most
    one chunk per slot."""
    want = max(1, (4 * sm_count(device)) // max(1, batch * n_kv_heads))
    return max(1, min(next_pow2(want), next_pow2(slots)))


def default_pages_per_iter(slots_per_chunk: int) -> int:
    """Slots per loop iteration: 2 (tiles of ``2 * P`` tokens) once a chunk spans 8 slots or more, else 1.
    At batch 8 with 8 KV heads (8 chunks of 8 slots) this is the fastest of the shapes swept (about 5% faster
    per layer of a captured step than one slot per iteration, docs/BENCHMARKS.md); short chunks (batch 1: one
    slot each) keep one."""
    return 2 if slots_per_chunk >= 8 else 1


def _partials(rows: int, d: int, device: torch.device, workspace: torch.Tensor | None):
    """float32 ``[rows, D]`` partial outputs and ``[rows]`` log-sum-exps, carved from ``workspace`` when it
    is large enough (no allocation in a decode step)."""
    need = rows * (d + 1) * 4
    if workspace is None or workspace.numel() < need:
        return (torch.empty((rows, d), dtype=torch.float32, device=device),
                torch.empty((rows,), dtype=torch.float32, device=device))
    buf = workspace[:need].view(torch.float32)
    return buf[: rows * d].view(rows, d), buf[rows * d:]


def split_decode_attention(q: torch.Tensor, ws_k: torch.Tensor, ws_v: torch.Tensor, kv_indptr: torch.Tensor,
                           kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor, *, max_slots: int,
                           sm_scale: float | None = None, n_split: int | None = None, out: torch.Tensor | None = None,
                           workspace: torch.Tensor | None = None, pages_per_iter: int | None = None,
                           num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Attention of ``q`` over each request's working-set slots, split along the slots.

    Args:
        q: ``[B, Hq, D]`` bf16/fp16 (rows may be strided).
        ws_k, ws_v: ``[n_slots, P, Hkv, D]`` contiguous, ``q``'s dtype.
        kv_indptr: int32 ``[B+1]``; kv_indices: int32 slot ids; kv_last_page_len: int32 ``[B]``
            (tokens of each request's last slot, ``1..P``), all on ``q``'s device.
        max_slots: ``S``, the most slots a request lists (``layout.slots``): fixes the grid.
        sm_scale: softmax scale (default ``1/sqrt(D)``).
        n_split: chunks per (request, KV head) (default :func:`default_split`).
        out: optional ``[B, Hq, D]`` output.
        workspace: optional uint8 scratch on ``q``'s device for the chunks' partial results
            (``B * Hq * n_split * (D + 1) * 4`` bytes; FlashInfer's float workspace fits any decode
            batch); without it, or when it is too small, they are allocated.
        pages_per_iter: slots each program reads per loop iteration (1, 2 or 4; a tile of
            ``pages_per_iter * P`` tokens; default :func:`default_pages_per_iter`); each chunk is
            rounded up to a multiple of it.
        num_warps, num_stages: Triton launch options.
    Returns ``[B, Hq, D]`` in ``q``'s dtype. Requests with an empty slot list get zeros.
    """
    b, hq, d = q.shape
    n_slots, p, hkv, dk = ws_k.shape
    if dk != d or ws_v.shape != ws_k.shape or hq % hkv:
        raise ValueError(f"shapes: q {tuple(q.shape)}, ws_k {tuple(ws_k.shape)}, ws_v {tuple(ws_v.shape)}")
    if not (ws_k.is_contiguous() and ws_v.is_contiguous()) or q.stride(2) != 1:
        raise ValueError("working sets must be contiguous and q's rows contiguous in the head dim")
    if p < 16:
        raise NotImplementedError(f"the Triton split decode needs a page size >= 16 (got {p}); "
                                  "use FREEKV_DECODE_ATTENTION=flashinfer")
    check_page_size(p)
    check_head_dim(d)
    out = out if out is not None else torch.empty_like(q)
    if b == 0:
        return out
    g = hq // hkv
    if pages_per_iter not in (None, 1, 2, 4):
        raise ValueError(f"pages_per_iter must be 1, 2 or 4 (got {pages_per_iter})")
    n_split = n_split or default_split(b, hkv, max_slots, q.device)
    per_split = -(-max_slots // n_split)
    pages_per_iter = pages_per_iter or default_pages_per_iter(per_split)
    per_split = -(-per_split // pages_per_iter) * pages_per_iter
    po, plse = _partials(b * hq * n_split, d, q.device, workspace)
    scale = (float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)) * math.log2(math.e)
    interp = interpreter_forced()  # the interpreter takes no launch options
    _split_decode_kernel[(b, hkv, n_split)](
        q, ws_k, ws_v, kv_indptr, kv_indices, kv_last_page_len, po, plse, scale, q.stride(0), q.stride(1),
        HKV=hkv, G=g, G_PAD=max(16, next_pow2(g)), PAGE=p, D=d, N_SPLIT=n_split, PER_SPLIT=per_split,
        PAGES=pages_per_iter, DOT_F32=interp, **({} if interp else {"num_warps": num_warps, "num_stages": num_stages}))
    _merge_kernel[(b, hq)](po, plse, out, out.stride(0), out.stride(1), HQ=hq, D=d, N_SPLIT=n_split,
                           SPLIT_PAD=max(2, next_pow2(n_split)), **({} if interp else {"num_warps": 4}))
    return out


class SplitDecode:
    """:func:`split_decode_attention` over a fixed CSR page table (the runtime's eager buffers), with its
    partial results in ``workspace`` (e.g. FlashInfer's float workspace, unused by this kernel's runs).

    No host plan: :meth:`run` reads the table's first ``B`` rows on the GPU, so it is
    recordable in a CUDA graph for any batch size up to the table's.
    """

    def __init__(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor,
                 max_slots: int, workspace: torch.Tensor | None = None):
        self.kv_indptr, self.kv_indices, self.kv_last_page_len = kv_indptr, kv_indices, kv_last_page_len
        self.max_slots = max_slots
        self.workspace = workspace  # uint8 scratch for the partial results (see split_decode_attention)

    def run(self, q: torch.Tensor, ws_k: torch.Tensor, ws_v: torch.Tensor, sm_scale: float | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        b = q.shape[0]
        return split_decode_attention(q, ws_k, ws_v, self.kv_indptr[: b + 1], self.kv_indices,
                                      self.kv_last_page_len[:b], max_slots=self.max_slots, sm_scale=sm_scale,
                                      out=out, workspace=self.workspace)
