"""Per-piece host-to-device copies through the copy engine, issued below Python's tensor layer.

The comparison recalls issue one copy per (page, KV head) block of the host store: the paper's
staged recall into a staging buffer, the ArkVale-style baseline straight into the strided NHD
slot rows. Issuing each as ``dst[...].copy_(src[p, h], non_blocking=True)`` costs tensor views and
a dispatch (about 20 µs per piece), far below what the copy engine does with 8-16 KiB copies
(3-6 GB/s when issued from C). :func:`copy_blocks` computes the addresses itself and calls
``cudaMemcpy2DAsync`` of the CUDA runtime torch has loaded, through ``ctypes`` (about 1 µs per
call); for a contiguous destination block the 2-D copy is one plain block copy.

The copy function is injectable: the CPU tests pass a ``ctypes.memmove``-based one and check the
address arithmetic against plain-torch indexing.
"""

from __future__ import annotations

import ctypes

import torch

_H2D = 1  # cudaMemcpyHostToDevice
_MEMCPY2D = None


def _cuda_memcpy2d():
    """``cudaMemcpy2DAsync`` of the CUDA runtime loaded in this process (found by soname)."""
    global _MEMCPY2D
    if _MEMCPY2D is None:
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
            try:
                fn = ctypes.CDLL(name).cudaMemcpy2DAsync
            except (OSError, AttributeError):
                continue
            # dst, dpitch, src, spitch, width, height, kind, stream
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                           ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            fn.restype = ctypes.c_int
            _MEMCPY2D = fn
            break
        else:
            raise RuntimeError("the CUDA runtime library (libcudart) was not found in this process; the staged and "
                               "per-page recalls need it (the default gather recall does not)")
    return _MEMCPY2D


def cuda_memcpy2d_h2d(stream: int):
    """A ``memcpy2d(dst, dpitch, src, spitch, width, height)`` issuing ``cudaMemcpy2DAsync``
    host-to-device on ``stream`` (a ``cudaStream_t`` as int); raises if a call fails."""
    fn = _cuda_memcpy2d()

    def memcpy2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        rc = fn(dst, dpitch, src, spitch, width, height, _H2D, stream)
        if rc != 0:
            raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {rc}")

    return memcpy2d


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, pages: list[int], heads: list[int], slots: list[int],
                memcpy2d) -> None:
    """``dst[slots[j], :, heads[j], :] = src[pages[j], heads[j]]`` for every ``j``, one ``memcpy2d`` each.

    Args:
        src: host store of one layer, K or V, ``[n_pages, Hkv, P, D]``; each ``[P, D]`` block contiguous.
        dst: ``[n, P, Hkv, D]`` with rows contiguous along ``D``: working-set slots (NHD), or a
            staging buffer ``[n, P, D]`` seen as ``buf[:, :, None, :].expand(-1, -1, Hkv, -1)``
            (head stride 0: every head lands in the block itself).
    """
    if src.stride(3) != 1 or src.stride(2) != src.shape[3]:
        raise ValueError("each [P, D] block of the host store must be contiguous")
    if dst.stride(3) != 1 or dst.shape[1:] != (src.shape[2], src.shape[1], src.shape[3]):
        raise ValueError(f"destination {tuple(dst.shape)} (stride {dst.stride()}) does not take [P, D] blocks of "
                         f"a {tuple(src.shape)} store with rows contiguous along D")
    if len(pages) and (max(slots) >= dst.shape[0] or max(pages) >= src.shape[0] or min(pages) < 0
                       or min(slots) < 0 or not 0 <= min(heads) <= max(heads) < src.shape[1]):
        raise ValueError(f"a block lies outside the store ({src.shape[0]} pages, {src.shape[1]} heads) or the "
                         f"destination ({dst.shape[0]} slots)")
    el = src.element_size()
    rows, width = src.shape[2], src.shape[3] * el
    s0, s_page, s_head = src.data_ptr(), src.stride(0) * el, src.stride(1) * el
    d0, d_slot, d_row, d_head = dst.data_ptr(), dst.stride(0) * el, dst.stride(1) * el, dst.stride(2) * el
    for p, h, s in zip(pages, heads, slots):
        memcpy2d(d0 + s * d_slot + h * d_head, d_row, s0 + p * s_page + h * s_head, width, width, rows)
