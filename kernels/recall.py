"""Recall: copy selected (page, KV head) pieces from the host store (HND) into GPU slots (NHD).

A *piece* ``i`` is one KV head of one host page: ``host_k[host_page[i], head[i]]`` is a
contiguous ``[P, D]`` block (8 KiB at P=32, D=128, bf16) that lands in
``ws_k[dst_slot[i], :, head[i], :]`` (``P`` rows strided by ``Hkv * D``); same for V.
Entries with ``dst_slot < 0`` are skipped. Three strategies, same result:

* :func:`recall_gather` (default): one Triton kernel reads pinned host memory directly
  (unified addressing, :mod:`.uva`) and writes the NHD slots; fixed-size inputs, no host
  sync, CUDA-graph capturable; a persistent grid of ``num_programs`` programs walks the
  flattened ``N * P`` rows, so only a few SMs are held while PCIe does the work.
* :func:`recall_staged`: the paper's design. The piece list goes to the host (a sync), each
  piece is one block copy (issued through ``ctypes`` by :mod:`.host_copy`) into one of two
  staging buffers on a copy stream, while the gather kernel scatters the other buffer into the
  slots on the caller's stream (double buffering across chunks). Eager only.
* :func:`recall_per_page`: the ArkVale-style baseline, one copy per piece straight into the
  (strided) slot rows (``cudaMemcpy2DAsync`` through :mod:`.host_copy`), then a stream sync.
  Eager only.

:func:`recall_selected_pieces` turns the selection outputs into a flat, compacted piece list.
"""

from __future__ import annotations

import torch

from .common import (check_gpu_tier, check_head_dim, check_kv_dtype, check_page_size, check_tier_dtype, cdiv,
                     interpreter_forced, next_pow2, sm_count, tier_read_reference, tl, triton, use_triton)
from .host_copy import copy_blocks, cuda_memcpy2d_h2d
from .uva import kernel_arg

#: Default persistent-grid size of :func:`recall_gather` (see the kernel benchmark).
DEFAULT_NUM_PROGRAMS = 64

if triton is not None:

    @triton.jit
    def _load_pieces(hk_ptr, hv_ptr, gk_ptr, gv_ptr, src, m, page, n_host, page_stride, TIERED: tl.constexpr):
        """K and V at element offsets ``src`` ``[N, D]`` (mask ``m``) of the host tier, or of the GPU tier
        for the rows whose ``page`` ``[N]`` is ``n_host`` or above (``page_stride`` elements per page).
        Host reads are streamed once: evict-first, so they don't push the working set out of L2."""
        if TIERED:
            in_gpu = (page >= n_host)[:, None]
            # (page - n_host) is int64 like page: an int32 n_host * page_stride wraps once the host
            # tier passes 2**31 elements (4 GiB of bf16 per layer's K), far below real tier sizes
            gsrc = src + ((page - n_host) - page)[:, None] * page_stride
            kg = tl.load(gk_ptr + gsrc, mask=m & in_gpu)
            vg = tl.load(gv_ptr + gsrc, mask=m & in_gpu)
            kx = tl.load(hk_ptr + src, mask=m & (in_gpu == 0), eviction_policy="evict_first")
            vx = tl.load(hv_ptr + src, mask=m & (in_gpu == 0), eviction_policy="evict_first")
            kx = tl.where(in_gpu, kg, kx)
            vx = tl.where(in_gpu, vg, vx)
        else:
            kx = tl.load(hk_ptr + src, mask=m, eviction_policy="evict_first")
            vx = tl.load(hv_ptr + src, mask=m, eviction_policy="evict_first")
        return kx, vx

    @triton.jit
    def _recall_rows_kernel(
        src_k, src_v, dst_k, dst_v, page_ptr, slot_ptr, head_ptr, gk_ptr, gv_ptr,
        n_rows, n_iters, n_programs, src_page_stride, src_head_stride, dst_slot_stride, dst_row_stride, n_host,
        PAGE: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, ITERS: tl.constexpr, TIERED: tl.constexpr,
    ):
        # ITERS: 0 on the GPU (runtime trip count n_iters); the trip count under the CPU
        # interpreter, whose loops over runtime scalars break with numpy >= 2.
        # Persistent grid (n_programs programs) over the flattened rows, BLOCK_R rows per step:
        # global row g = piece g // P, row g % P of that piece.
        pid = tl.program_id(0)
        r = tl.arange(0, BLOCK_R)
        d = tl.arange(0, D)
        for it in range(0, ITERS if ITERS > 0 else n_iters):
            blk = pid + it * n_programs
            g = blk.to(tl.int64) * BLOCK_R + r
            in_range = g < n_rows
            piece = g // PAGE
            row = g % PAGE
            slot = tl.load(slot_ptr + piece, mask=in_range, other=-1).to(tl.int64)
            ok = in_range & (slot >= 0)
            page = tl.load(page_ptr + piece, mask=ok, other=0).to(tl.int64)
            head = tl.load(head_ptr + piece, mask=ok, other=0).to(tl.int64)
            src = (page * src_page_stride + head * src_head_stride + row * D)[:, None] + d[None, :]
            dst = (slot * dst_slot_stride + row * dst_row_stride + head * D)[:, None] + d[None, :]
            m = ok[:, None]
            kx, vx = _load_pieces(src_k, src_v, gk_ptr, gv_ptr, src, m, page, n_host, src_page_stride, TIERED)
            tl.store(dst_k + dst, kx.to(dst_k.dtype.element_ty), mask=m)  # FP8 tier: widened
            tl.store(dst_v + dst, vx.to(dst_v.dtype.element_ty), mask=m)


def _check(host_k, host_v, ws_k, ws_v, host_page, dst_slot, head, widen: bool = True):
    n_pages, hkv, p, d = host_k.shape
    if host_v.shape != host_k.shape or ws_k.shape[1:] != (p, hkv, d) or ws_v.shape != ws_k.shape:
        raise ValueError(f"shape mismatch: host {tuple(host_k.shape)}, ws {tuple(ws_k.shape)}/{tuple(ws_v.shape)}")
    if not (host_k.dtype == host_v.dtype and ws_k.dtype == ws_v.dtype):
        raise ValueError("K and V must have one dtype in the host store and in the working set")
    if widen:  # the gather kernels widen an FP8 tier into the working set's dtype
        check_tier_dtype(host_k.dtype, ws_k.dtype)
    elif host_k.dtype != ws_k.dtype:  # byte copies (staged, per-page)
        raise ValueError(f"this recall copies bytes: the host store ({host_k.dtype}) and the working set "
                         f"({ws_k.dtype}) must have one dtype")
    if not (host_k.is_contiguous() and host_v.is_contiguous() and ws_k.is_contiguous() and ws_v.is_contiguous()):
        raise ValueError("host store and working set must be contiguous")
    n = dst_slot.shape[0]
    if host_page.shape != (n,) or head.shape != (n,):
        raise ValueError("host_page, dst_slot, head must be 1-D of one length")
    check_head_dim(d)
    check_page_size(p)
    check_kv_dtype(ws_k.dtype)


def _launch_rows(src_k, src_v, ws_k, ws_v, page, slot, head, src_page_stride, src_head_stride, num_programs,
                 block_rows, gpu_k=None, gpu_v=None):
    p, hkv, d = ws_k.shape[1:]
    n_rows = slot.shape[0] * p
    if n_rows == 0:
        return
    if block_rows is None:
        block_rows = max(1, min(8192 // d, 256))
    n_blocks = cdiv(n_rows, block_rows)
    n_prog = max(1, min(num_programs or DEFAULT_NUM_PROGRAMS, n_blocks))
    n_iters = cdiv(n_blocks, n_prog)
    _recall_rows_kernel[(n_prog,)](
        kernel_arg(src_k), kernel_arg(src_v), ws_k, ws_v, page, slot, head,
        gpu_k if gpu_k is not None else ws_k, gpu_v if gpu_v is not None else ws_v,
        n_rows, n_iters, n_prog, src_page_stride, src_head_stride, ws_k.stride(0), ws_k.stride(1), src_k.shape[0],
        PAGE=p, D=d, BLOCK_R=block_rows, ITERS=n_iters if interpreter_forced() else 0, TIERED=gpu_k is not None,
        num_warps=4,
    )


def recall_reference(host_k, host_v, ws_k, ws_v, host_page, dst_slot, head, gpu_k=None, gpu_v=None) -> None:
    """Plain-torch recall (any devices): ``ws[dst_slot, :, head, :] = tier[host_page, head]`` (pages from
    ``n_host_pages`` on read from the GPU tier ``gpu_k``/``gpu_v`` when given)."""
    slot = dst_slot.long()
    valid = slot >= 0
    s, pg, h = slot[valid], host_page.to(slot.device).long()[valid], head.to(slot.device).long()[valid]
    wdev = ws_k.device
    ws_k[s.to(wdev), :, h.to(wdev), :] = tier_read_reference(host_k, gpu_k, pg, h, wdev).to(ws_k.dtype)
    ws_v[s.to(wdev), :, h.to(wdev), :] = tier_read_reference(host_v, gpu_v, pg, h, wdev).to(ws_v.dtype)


#: The reference of every recall strategy (they all compute the same result).
recall_gather_reference = recall_staged_reference = recall_per_page_reference = recall_reference


def recall_gather(host_k: torch.Tensor, host_v: torch.Tensor, ws_k: torch.Tensor, ws_v: torch.Tensor,
                  host_page: torch.Tensor, dst_slot: torch.Tensor, head: torch.Tensor, *,
                  num_programs: int | None = None, block_rows: int | None = None, gpu_k: torch.Tensor | None = None,
                  gpu_v: torch.Tensor | None = None, impl: str | None = None) -> None:
    """Recall the listed pieces with one zero-copy gather kernel (graph-capturable).

    Args:
        host_k, host_v: ``[n_host_pages, Hkv, P, D]`` bf16/fp16, contiguous, pinned host memory.
        ws_k, ws_v: ``[n_slots, P, Hkv, D]`` same dtype, contiguous, on the GPU.
        host_page, dst_slot, head: int32/int64 ``[N]`` on the GPU; ``dst_slot < 0`` = skip.
        num_programs: persistent grid size (default :data:`DEFAULT_NUM_PROGRAMS`); each
            program keeps ``block_rows * D`` elements of K and of V in flight.
        block_rows: rows per program iteration (default ``8192 // D``).
        gpu_k, gpu_v: optional GPU tier ``[n_gpu, Hkv, P, D]``: pages from ``n_host_pages`` on are read there.
    Runs on the current stream (the runtime sets a side stream); no host synchronisation.
    """
    check_gpu_tier(host_k, gpu_k, gpu_v)
    if not use_triton(impl, ws_k, dst_slot):
        return recall_reference(host_k, host_v, ws_k, ws_v, host_page, dst_slot, head, gpu_k, gpu_v)
    _check(host_k, host_v, ws_k, ws_v, host_page, dst_slot, head)
    hkv, p, d = host_k.shape[1:]
    _launch_rows(host_k, host_v, ws_k, ws_v, host_page, dst_slot, head, hkv * p * d, p * d, num_programs, block_rows,
                 gpu_k, gpu_v)


class StagedRecall:
    """Double-buffered staged recall (the paper's strategy); one instance per device/shape.

    Two staging buffers ``[chunk, P, D]`` for K and V each; per chunk of pieces, H2D copies
    (one block copy per (page, head), :func:`.host_copy.copy_blocks`) run on ``copy_stream``
    into buffer ``c % 2`` while the scatter of the previous chunk (the gather kernel with
    the staging buffer as its source) runs on the caller's stream.
    """

    def __init__(self, p: int, d: int, dtype: torch.dtype, device: torch.device, chunk: int = 256):
        self.chunk = chunk
        self.stage_k = [torch.empty((chunk, p, d), dtype=dtype, device=device) for _ in range(2)]
        self.stage_v = [torch.empty((chunk, p, d), dtype=dtype, device=device) for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(device=device)
        self.copied = [torch.cuda.Event() for _ in range(2)]
        self.scattered = [torch.cuda.Event() for _ in range(2)]
        self.rows = torch.arange(chunk, dtype=torch.int32, device=device)
        self.memcpy2d = cuda_memcpy2d_h2d(self.copy_stream.cuda_stream)

    def __call__(self, host_k, host_v, ws_k, ws_v, host_page, dst_slot, head, *, num_programs=None) -> None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("recall_staged synchronises with the host and cannot be captured; use recall_gather")
        lists = torch.stack([host_page.long(), dst_slot.long(), head.long()]).cpu()  # host sync (by design)
        lists = lists[:, lists[1] >= 0]
        n = lists.shape[1]
        if n == 0:
            return
        pages, heads = lists[0].tolist(), lists[2].tolist()
        dev_lists = lists.to(ws_k.device, non_blocking=False)
        cur = torch.cuda.current_stream(ws_k.device)
        self.copy_stream.wait_stream(cur)  # host data written by earlier kernels on this stream
        for c, start in enumerate(range(0, n, self.chunk)):
            buf = c % 2
            end = min(start + self.chunk, n)
            if c >= 2:
                self.copy_stream.wait_event(self.scattered[buf])
            with torch.cuda.stream(self.copy_stream):
                sk, sv = self.stage_k[buf], self.stage_v[buf]
                hkv = host_k.shape[1]
                for src, stage in ((host_k, sk), (host_v, sv)):  # block j -> staging row j (head stride 0)
                    copy_blocks(src, stage[:, :, None, :].expand(-1, -1, hkv, -1), pages[start:end],
                                heads[start:end], range(end - start), self.memcpy2d)
                self.copied[buf].record(self.copy_stream)
            cur.wait_event(self.copied[buf])
            m = end - start
            _launch_rows(self.stage_k[buf], self.stage_v[buf], ws_k, ws_v, self.rows[:m],
                         dev_lists[1, start:end], dev_lists[2, start:end], sk.stride(0), 0, num_programs, None)
            self.scattered[buf].record(cur)
        # staging buffers are reused by the next call only after the copy stream waits on
        # `scattered`; the caller's stream already orders the scatters before later work.


_STAGED: dict = {}


def recall_staged(host_k: torch.Tensor, host_v: torch.Tensor, ws_k: torch.Tensor, ws_v: torch.Tensor,
                  host_page: torch.Tensor, dst_slot: torch.Tensor, head: torch.Tensor, *, chunk: int = 256,
                  num_programs: int | None = None, impl: str | None = None) -> None:
    """Staged double-buffered recall (paper's strategy). Same arguments and result as :func:`recall_gather`.

    Synchronises the host once (to read the piece list); eager only. Without CUDA it
    falls back to :func:`recall_reference`.
    """
    if not use_triton(impl, ws_k, dst_slot) or not ws_k.is_cuda:  # streams and async copies need CUDA
        return recall_reference(host_k, host_v, ws_k, ws_v, host_page, dst_slot, head)
    _check(host_k, host_v, ws_k, ws_v, host_page, dst_slot, head, widen=False)
    p, d = host_k.shape[2:]
    key = (ws_k.device, ws_k.dtype, p, d, chunk)
    if key not in _STAGED:
        _STAGED[key] = StagedRecall(p, d, ws_k.dtype, ws_k.device, chunk)
    _STAGED[key](host_k, host_v, ws_k, ws_v, host_page, dst_slot, head, num_programs=num_programs)


def recall_per_page(host_k: torch.Tensor, host_v: torch.Tensor, ws_k: torch.Tensor, ws_v: torch.Tensor,
                    host_page: torch.Tensor, dst_slot: torch.Tensor, head: torch.Tensor, *,
                    impl: str | None = None) -> None:
    """ArkVale-style baseline: one host-to-device copy per piece into the strided slot, then a
    stream sync. Same arguments and result as :func:`recall_gather`; eager only."""
    if not use_triton(impl, ws_k, dst_slot) or not ws_k.is_cuda:
        return recall_reference(host_k, host_v, ws_k, ws_v, host_page, dst_slot, head)
    _check(host_k, host_v, ws_k, ws_v, host_page, dst_slot, head, widen=False)
    lists = torch.stack([host_page.long(), dst_slot.long(), head.long()]).cpu()  # host sync
    pages, slots, heads = lists[:, lists[1] >= 0].tolist()
    stream = torch.cuda.current_stream(ws_k.device)
    memcpy2d = cuda_memcpy2d_h2d(stream.cuda_stream)  # one 2-D copy per (page, head) into its slot rows
    copy_blocks(host_k, ws_k, pages, heads, slots, memcpy2d)
    copy_blocks(host_v, ws_v, pages, heads, slots, memcpy2d)
    stream.synchronize()


def recall_selected_pieces(recall_slot: torch.Tensor, recall_page: torch.Tensor, req_to_token: torch.Tensor,
                           rows: torch.Tensor, *, page_size: int, slot_base: int,
                           select_slot0: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flat, compacted piece list of :func:`recall_selected` (torch ops, no host sync, graph-safe).

    Args:
        recall_slot, recall_page: int ``[B, Hkv, k]`` selected-slot index in ``[0, k)`` and logical page
            (``-1`` = none), as :func:`.select.select_update` writes them.
        req_to_token: int32 ``[R+1, max_ctx]``; rows: int ``[B]`` request rows.
        page_size: ``P``; slot_base: slots per request row in the working set (row ``r``
            owns slots ``[r * slot_base, (r+1) * slot_base)``); select_slot0: first
            selected slot within a row (``layout.n_sink``).
    Returns:
        ``(host_page, dst_slot, head)`` int32 ``[B * Hkv * k]``: the valid pieces first, in
        ``(b, h, t)`` order, then ``-1`` entries (compacting spreads the work evenly over
        the gather kernel's programs), with
        ``dst_slot = rows[b] * slot_base + select_slot0 + recall_slot[b, h, t]``,
        ``host_page = req_to_token[rows[b], recall_page[b, h, t] * P] // P``, ``head = h``.
    """
    recall_slot, recall_page = recall_slot.long(), recall_page.long()
    b, hkv, k = recall_slot.shape
    n = b * hkv * k
    valid = recall_slot >= 0
    rows = rows.long().view(b, 1, 1).expand(b, hkv, k)
    page = torch.where(valid, recall_page, torch.zeros_like(recall_page))
    tok = req_to_token[rows, page * page_size].long()
    heads = torch.arange(hkv, device=recall_slot.device).view(1, hkv, 1).expand(b, hkv, k)
    vals = torch.stack([tok // page_size, rows * slot_base + select_slot0 + recall_slot, heads]).view(3, n)
    vflat = valid.reshape(n)
    dest = torch.where(vflat, torch.cumsum(vflat, 0) - 1, torch.full_like(vflat, n, dtype=torch.long))
    out = torch.full((3, n + 1), -1, dtype=torch.long, device=recall_slot.device)
    out.scatter_(1, dest.view(1, n).expand(3, n), torch.where(vflat, vals, -1))
    out = out[:, :n].to(torch.int32)
    return out[0], out[1], out[2]


# ---------------------------------------------------------------------------------------------
# Recall straight from the selection lists (used by the runtime): no flat piece list.
if triton is not None:

    @triton.jit
    def _recall_selected_kernel(
        hk_ptr, hv_ptr, wk_ptr, wv_ptr, rslot_ptr, rpage_ptr, rows_ptr, r2t_ptr, r2t_stride, gk_ptr, gv_ptr,
        n_lists, n_iters, n_programs, n_host,
        HKV: tl.constexpr, K: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
        SLOT_BASE: tl.constexpr, SLOT0: tl.constexpr, CH: tl.constexpr, ITERS: tl.constexpr, TIERED: tl.constexpr,
    ):
        # Persistent grid over chunks of CH consecutive entries of one (request, KV head) list
        # (``n_lists`` = B * Hkv lists of K entries, valid entries first). Chunks are numbered
        # position-major: chunk c is chunk c // n_lists of list c % n_lists, so the first
        # chunks of all lists (where the valid entries are) come first and program pid, taking
        # chunks pid, pid + n_programs, ..., gets its share of them whatever the grid size (list-
        # major numbering would leave a grid that is a multiple of the chunks per list with most
        # programs idle). One chunk is one [CH * PAGE, D] tile: the list lookups of its CH pieces
        # and their host reads are issued together. Entries with slot < 0 move nothing. A small
        # grid leaves the other SMs to the compute stream.
        pid = tl.program_id(0)
        rr = tl.arange(0, CH * PAGE)
        j = rr // PAGE
        r = (rr % PAGE).to(tl.int64)
        d = tl.arange(0, D)
        n_chunks = n_lists * ((K + CH - 1) // CH)
        for it in range(0, ITERS if ITERS > 0 else n_iters):
            c = (pid + it * n_programs).to(tl.int64)
            bh = c % n_lists + 0 * j  # the tile rows' list (one per chunk)
            t = (c // n_lists) * CH + j  # position of each tile row's entry in its list
            inr = (c < n_chunks) & (t < K)
            e = bh * K + t
            slot = tl.load(rslot_ptr + e, mask=inr, other=-1).to(tl.int64)
            ok = slot >= 0
            page = tl.load(rpage_ptr + e, mask=ok, other=0).to(tl.int64)
            b = bh // HKV
            h = bh % HKV
            row = tl.load(rows_ptr + b, mask=ok, other=0).to(tl.int64)
            tok = tl.load(r2t_ptr + row * r2t_stride + page * PAGE, mask=ok, other=0).to(tl.int64)
            hpage = tok // PAGE
            dst_slot = row * SLOT_BASE + SLOT0 + slot
            m = ok[:, None] & (d[None, :] >= 0)
            src = (((hpage * HKV + h) * PAGE + r) * D)[:, None] + d[None, :]
            dst = (((dst_slot * PAGE + r) * HKV + h) * D)[:, None] + d[None, :]
            kx, vx = _load_pieces(hk_ptr, hv_ptr, gk_ptr, gv_ptr, src, m, hpage, n_host, HKV * PAGE * D, TIERED)
            tl.store(wk_ptr + dst, kx.to(wk_ptr.dtype.element_ty), mask=m)  # FP8 tier: widened
            tl.store(wv_ptr + dst, vx.to(wv_ptr.dtype.element_ty), mask=m)


#: Default grid of :func:`recall_selected` (at most one program per SM): 8 programs already saturate the link,
#: while every program holds its SM's slot for the whole transfer, which a concurrent compute kernel pays for
#: (32 measured faster than one per SM inside a decode step, and than 8).
DEFAULT_RECALL_PROGRAMS = 32
DEFAULT_RECALL_WARPS = 8
RECALL_WARPS_CHOICES = (1, 2, 4, 8, 16)


def recall_selected_reference(host_k, host_v, ws_k, ws_v, recall_slot, recall_page, req_to_token, rows, *,
                              page_size, slot_base, select_slot0, gpu_k=None, gpu_v=None) -> None:
    """Plain torch :func:`recall_selected` (any device)."""
    hp, ds, hd = recall_selected_pieces(recall_slot, recall_page, req_to_token, rows, page_size=page_size,
                                        slot_base=slot_base, select_slot0=select_slot0)
    recall_reference(host_k, host_v, ws_k, ws_v, hp, ds, hd, gpu_k, gpu_v)


def recall_selected(host_k: torch.Tensor, host_v: torch.Tensor, ws_k: torch.Tensor, ws_v: torch.Tensor,
                    recall_slot: torch.Tensor, recall_page: torch.Tensor, req_to_token: torch.Tensor,
                    rows: torch.Tensor, *, page_size: int, slot_base: int, select_slot0: int,
                    num_programs: int | None = None, num_warps: int | None = None,
                    gpu_k: torch.Tensor | None = None, gpu_v: torch.Tensor | None = None,
                    impl: str | None = None) -> None:
    """Recall the pieces listed by :func:`.select.select_update` on a persistent grid of programs.

    Args:
        host_k, host_v: ``[n_host_pages, Hkv, P, D]`` pinned host tier of the layer.
        ws_k, ws_v: ``[n_slots, P, Hkv, D]`` working-set slots of the layer.
        recall_slot, recall_page: int ``[B, Hkv, k]`` selected-slot index and logical page, ``-1`` = none.
        req_to_token: int32 ``[R+1, max_ctx]``; rows: int ``[B]``.
        page_size, slot_base (= slots per row), select_slot0 (= first selected slot in a row).
    Piece ``(b, h, t)`` copies ``host[req_to_token[rows[b], page*P] // P, h]`` into
    ``ws[rows[b]*slot_base + select_slot0 + slot, :, h, :]``. Graph-capturable, no host sync.
    ``num_programs``: persistent grid size (default :data:`DEFAULT_RECALL_PROGRAMS`, at most one per SM);
    ``num_warps``: warps per program, one of :data:`RECALL_WARPS_CHOICES` (default :data:`DEFAULT_RECALL_WARPS`;
    fewer warps hold fewer of an SM's registers and warp slots, which a compute kernel sharing it can use).
    ``gpu_k``, ``gpu_v``: optional GPU tier ``[n_gpu, Hkv, P, D]`` holding pages ``n_host_pages`` and up.
    """
    if num_warps is not None and num_warps not in RECALL_WARPS_CHOICES:
        raise ValueError(f"num_warps must be one of {RECALL_WARPS_CHOICES}, got {num_warps}")
    check_gpu_tier(host_k, gpu_k, gpu_v)
    if not use_triton(impl, ws_k, recall_slot):
        return recall_selected_reference(host_k, host_v, ws_k, ws_v, recall_slot, recall_page, req_to_token, rows,
                                         page_size=page_size, slot_base=slot_base, select_slot0=select_slot0,
                                         gpu_k=gpu_k, gpu_v=gpu_v)
    b, hkv, k = recall_slot.shape
    if b == 0:
        return
    p, d = host_k.shape[2], host_k.shape[3]  # host pages are [n_pages, Hkv, P, D]
    check_head_dim(d)
    check_page_size(p)
    warps = num_warps or DEFAULT_RECALL_WARPS
    # pieces per tile: 16 rows per warp (128-row tiles, 4 pieces at P=32, with the default 8 warps), so a
    # thread holds the same share of the tile whatever the warp count (fewer warps, smaller tiles: no spills)
    ch = min(max(1, 16 * warps // p), next_pow2(k))
    n_chunks = b * hkv * cdiv(k, ch)
    n_prog = min(n_chunks, num_programs or min(DEFAULT_RECALL_PROGRAMS, sm_count(ws_k.device)))
    n_iters = cdiv(n_chunks, n_prog)
    _recall_selected_kernel[(n_prog,)](
        kernel_arg(host_k), kernel_arg(host_v), ws_k, ws_v, recall_slot, recall_page, rows, req_to_token,
        req_to_token.stride(0), gpu_k if gpu_k is not None else ws_k, gpu_v if gpu_v is not None else ws_v,
        b * hkv, n_iters, n_prog, host_k.shape[0], HKV=hkv, K=k, PAGE=p, D=d, SLOT_BASE=slot_base,
        SLOT0=select_slot0, CH=ch, ITERS=n_iters if interpreter_forced() else 0, TIERED=gpu_k is not None,
        num_warps=warps,
    )
