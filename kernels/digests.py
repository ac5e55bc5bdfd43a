"""Page digests (channel-wise max/min of a page's keys) written into the digest table.

For each listed page ``m`` (``row0[m] >= 0``) and KV head ``h``::

    digests[dst_page[m], h, 0, :] = max_{i<P} src[row0[m] + i, h, :]
    digests[dst_page[m], h, 1, :] = min_{i<P} src[row0[m] + i, h, :]

``src`` is any token-major ``[R, Hkv, D]`` view: the prefill's fresh keys (pages start at
multiples of ``P``) or ``ws_k.view(-1, Hkv, D)`` (a GPU slot ``s`` holds rows ``s*P ..``).
Digests are in the KV dtype; max/min are exact. Entries with ``row0 < 0`` are skipped.
"""

from __future__ import annotations

import torch

from freekv_sglang.algorithm.digests import page_digests

from .common import check_head_dim, check_kv_dtype, check_page_size, tl, triton, use_triton

if triton is not None:

    @triton.jit
    def _page_digests_kernel(
        src_ptr, row0_ptr, dst_ptr, dig_ptr,
        R, stride_sr, stride_sh,
        HKV: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        # grid: (M, Hkv). One program: one page x one KV head, P rows in chunks of BLOCK_P.
        m = tl.program_id(0)
        h = tl.program_id(1)
        row0 = tl.load(row0_ptr + m).to(tl.int64)
        page = tl.load(dst_ptr + m).to(tl.int64)
        if row0 >= 0:
            d = tl.arange(0, D)
            i = tl.arange(0, BLOCK_P)
            mx = tl.full([D], float("-inf"), tl.float32)
            mn = tl.full([D], float("inf"), tl.float32)
            for c in tl.static_range(0, PAGE, BLOCK_P):
                r = row0 + c + i
                ok = (r < R)[:, None]
                x = tl.load(src_ptr + (r * stride_sr + h * stride_sh)[:, None] + d[None, :], mask=ok).to(tl.float32)
                mx = tl.maximum(mx, tl.max(tl.where(ok, x, float("-inf")), axis=0))
                mn = tl.minimum(mn, tl.min(tl.where(ok, x, float("inf")), axis=0))
            base = dig_ptr + ((page * HKV + h) * 2) * D
            tl.store(base + d, mx.to(dig_ptr.dtype.element_ty))
            tl.store(base + D + d, mn.to(dig_ptr.dtype.element_ty))


def page_digests_from_rows_reference(src: torch.Tensor, row0: torch.Tensor, dst_page: torch.Tensor,
                                     digests: torch.Tensor, *, page_size: int) -> None:
    """Plain-torch :func:`page_digests_from_rows` (any device), built on ``algorithm.page_digests``."""
    row0 = row0.to(src.device).long()
    valid = row0 >= 0
    rows = (row0[valid][:, None] + torch.arange(page_size, device=src.device)).reshape(-1)
    dig = page_digests(src[rows], page_size)  # [M', Hkv, 2, D]
    digests[dst_page.to(digests.device).long()[valid.to(digests.device)]] = dig.to(digests.device)


def page_digests_from_rows(src: torch.Tensor, row0: torch.Tensor, dst_page: torch.Tensor, digests: torch.Tensor,
                           *, page_size: int, impl: str | None = None) -> None:
    """Digest ``P`` consecutive rows of ``src`` per listed page into ``digests``.

    Args:
        src: ``[R, Hkv, D]`` bf16/fp16 keys (rows may be strided; channels contiguous).
        row0: int32/int64 ``[M]`` first row of each page; ``< 0`` = skip (rows past ``R``
            are ignored by the kernel; callers must list whole pages).
        dst_page: int32/int64 ``[M]`` destination page (first index of ``digests``).
        digests: ``[n_host_pages, Hkv, 2, D]`` same dtype as ``src``, contiguous; index 0 of
            the third dim is the max, 1 the min. Written in place at the listed pages only.
        page_size: ``P``.
    """
    if not use_triton(impl, src, row0, dst_page, digests):
        return page_digests_from_rows_reference(src, row0, dst_page, digests, page_size=page_size)
    r, hkv, d = src.shape
    m = row0.shape[0]
    if digests.shape[1:] != (hkv, 2, d) or dst_page.shape != (m,):
        raise ValueError(f"shape mismatch: src {tuple(src.shape)}, row0 {tuple(row0.shape)}, "
                         f"dst_page {tuple(dst_page.shape)}, digests {tuple(digests.shape)}")
    check_head_dim(d)
    check_page_size(page_size)
    check_kv_dtype(src.dtype)
    if digests.dtype != src.dtype or not digests.is_contiguous():
        raise ValueError("digests must be contiguous and have the dtype of src")
    if src.stride(2) != 1:
        src = src.contiguous()
    if m == 0:
        return
    block_p = min(page_size, max(1, 4096 // d))
    _page_digests_kernel[(m, hkv)](
        src, row0, dst_page, digests, r, src.stride(0), src.stride(1),
        HKV=hkv, PAGE=page_size, D=d, BLOCK_P=block_p, num_warps=4,
    )

