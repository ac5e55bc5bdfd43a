"""Offload: write fresh K/V rows (NHD, on the GPU) into the pinned host store (HND pages).

Token slot ``loc`` (SGLang's KV index) lives in host page ``loc // P`` at offset ``loc % P``::

    host_k[loc // P, h, loc % P, :] = k[t, h, :]        (same for V)

Used after prefill (``T`` up to the whole prompt) and at every decode step (``T`` = batch).
The kernel stores straight into pinned host memory through unified addressing (see
:mod:`.uva`): no staging buffer, no copy engine, no host synchronisation; CUDA-graph safe.
Entries with ``loc < 0`` are skipped. With a GPU tier (``gpu_k``, ``gpu_v``), pages from
``n_host_pages`` on are written there instead (:mod:`.common`, KV tiers).
"""

from __future__ import annotations

import torch

from .common import (FP8_STORAGE, check_gpu_tier, check_head_dim, check_page_size, check_tier_dtype, cdiv,
                     interpreter_forced, tier_write_reference, tl, triton, use_triton)
from .uva import kernel_arg

if triton is not None:

    @triton.jit
    def _store_kv_host_kernel(
        k_ptr, v_ptr, loc_ptr, hk_ptr, hv_ptr, gk_ptr, gv_ptr,
        T, stride_kt, stride_kh, stride_vt, stride_vh, n_host, n_items, n_iters, n_programs,
        HKV: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, TIERED: tl.constexpr,
        ITERS: tl.constexpr, FP8: tl.constexpr,
    ):
        # Items are (block of BLOCK_T tokens, KV head) pairs, item = block * HKV + head; program pid takes
        # items pid, pid + n_programs, ... (one item each with the default grid of n_items programs; a
        # small persistent grid leaves the other SMs to concurrent compute). ITERS: the trip count under
        # the CPU interpreter, 0 on the GPU (runtime n_iters).
        pid = tl.program_id(0)
        d = tl.arange(0, D)
        for it in range(0, ITERS if ITERS > 0 else n_iters):
            item = pid + it * n_programs
            blk = item // HKV
            h = item % HKV
            t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
            in_range = (t < T) & (item < n_items)
            loc = tl.load(loc_ptr + t, mask=in_range, other=-1).to(tl.int64)
            valid = in_range & (loc >= 0)
            page = loc // PAGE
            off = loc % PAGE
            dst = ((page * HKV + h) * PAGE + off) * D  # int64 element offset in the host store
            t64 = t.to(tl.int64)
            m = valid[:, None]
            kx = tl.load(k_ptr + (t64 * stride_kt + h * stride_kh)[:, None] + d[None, :], mask=m)
            vx = tl.load(v_ptr + (t64 * stride_vt + h * stride_vh)[:, None] + d[None, :], mask=m)
            if FP8:  # an FP8 tier: saturate into its range, then the store converts
                kx = tl.minimum(tl.maximum(kx.to(tl.float32), -448.0), 448.0).to(hk_ptr.dtype.element_ty)
                vx = tl.minimum(tl.maximum(vx.to(tl.float32), -448.0), 448.0).to(hk_ptr.dtype.element_ty)
            if TIERED:  # pages from n_host on live in the GPU tier
                in_gpu = (page >= n_host)[:, None]
                gdst = (((page - n_host) * HKV + h) * PAGE + off) * D
                tl.store(gk_ptr + gdst[:, None] + d[None, :], kx, mask=m & in_gpu)
                tl.store(gv_ptr + gdst[:, None] + d[None, :], vx, mask=m & in_gpu)
                m = m & (in_gpu == 0)
            tl.store(hk_ptr + dst[:, None] + d[None, :], kx, mask=m)
            tl.store(hv_ptr + dst[:, None] + d[None, :], vx, mask=m)


def store_kv_host_reference(host_k: torch.Tensor, host_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            loc: torch.Tensor, gpu_k: torch.Tensor | None = None,
                            gpu_v: torch.Tensor | None = None) -> None:
    """Plain-torch :func:`store_kv_host` (any devices; the tiers are written in place)."""
    p = host_k.shape[2]
    loc = loc.long()
    valid = loc >= 0
    sel = loc[valid]
    tier_write_reference(host_k, gpu_k, sel // p, slice(None), sel % p, k[valid])
    tier_write_reference(host_v, gpu_v, sel // p, slice(None), sel % p, v[valid])


def store_kv_host(host_k: torch.Tensor, host_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  loc: torch.Tensor, *, gpu_k: torch.Tensor | None = None, gpu_v: torch.Tensor | None = None,
                  block_t: int = 32, num_warps: int = 4, num_programs: int | None = None,
                  impl: str | None = None) -> None:
    """Write ``k``, ``v`` into the host store at token slots ``loc``.

    Args:
        host_k, host_v: ``[n_host_pages, Hkv, P, D]`` contiguous, the KV dtype or FP8 e4m3 (values saturate
            at +-448), pinned host memory
            (or CUDA memory; any memory for the reference).
        k, v: ``[T, Hkv, D]`` same dtype, on the GPU; rows may be strided, channels contiguous.
        loc: int32/int64 ``[T]`` on the GPU: token slot of each row; ``< 0`` = skip.
        gpu_k, gpu_v: optional GPU tier ``[n_gpu, Hkv, P, D]``: pages ``n_host_pages`` and up live there
            (page ``n_host_pages + i`` is ``gpu_k[i]``).
        num_programs: persistent grid (each program walks ``(token block, head)`` items); ``None``: one
            program per item. A small grid holds few SMs while the link does the work (an offload
            beside compute, e.g. the asynchronous prefill offload).
        impl: ``None`` (auto), ``"triton"`` or ``"torch"`` (see :mod:`.common`).
    Writes ``host[loc // P, :, loc % P, :] = k`` (and ``v``); returns nothing. No host sync.
    """
    check_gpu_tier(host_k, gpu_k, gpu_v)
    if not use_triton(impl, k, v, loc):
        return store_kv_host_reference(host_k, host_v, k, v, loc, gpu_k, gpu_v)
    n_pages, hkv, p, d = host_k.shape
    t = k.shape[0]
    if host_v.shape != host_k.shape or k.shape != (t, hkv, d) or v.shape != (t, hkv, d) or loc.shape != (t,):
        raise ValueError(f"shape mismatch: host {tuple(host_k.shape)}/{tuple(host_v.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, loc {tuple(loc.shape)}")
    check_head_dim(d)
    check_page_size(p)
    check_tier_dtype(host_k.dtype, k.dtype)
    if not (k.dtype == v.dtype and host_k.dtype == host_v.dtype):
        raise ValueError(f"dtype mismatch: k {k.dtype}, v {v.dtype}, host {host_k.dtype}/{host_v.dtype}")
    if not (host_k.is_contiguous() and host_v.is_contiguous()):
        raise ValueError("host store tensors must be contiguous")
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    if t == 0:
        return
    if num_programs is not None and num_programs < 1:
        raise ValueError(f"num_programs must be positive, got {num_programs}")
    n_items = cdiv(t, block_t) * hkv
    n_prog = min(n_items, num_programs or n_items)
    n_iters = cdiv(n_items, n_prog)
    _store_kv_host_kernel[(n_prog,)](
        k, v, loc, kernel_arg(host_k), kernel_arg(host_v),
        gpu_k if gpu_k is not None else k, gpu_v if gpu_v is not None else v,
        t, k.stride(0), k.stride(1), v.stride(0), v.stride(1), n_pages, n_items, n_iters, n_prog,
        HKV=hkv, PAGE=p, D=d, BLOCK_T=block_t, TIERED=gpu_k is not None,
        ITERS=n_iters if interpreter_forced() else 0, FP8=host_k.dtype == FP8_STORAGE, num_warps=num_warps,
    )
