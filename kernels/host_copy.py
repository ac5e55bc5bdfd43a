"""Per-piece host-to-device copies through the copy engine, issued below Python's tensor layer.

The paper's recall issues one ``cudaMemcpyAsync`` per contiguous (page, KV head) block of the
host store. Issuing each one as ``dst[i].copy_(src[p, h], non_blocking=True)`` costs two tensor
views and a dispatch (about 20 µs per piece), which caps such a recall far below what the copy
engine does with 8-16 KiB copies (about 3-6 GB/s when issued from C). :class:`PieceCopier`
computes the addresses itself and calls ``cudaMemcpyAsync`` of the CUDA runtime that torch has
already loaded, through ``ctypes`` (about 1 µs per call). :meth:`PieceCopier.copy_to_slots` does
the same with one ``cudaMemcpy2DAsync`` per block straight into the strided NHD slot rows (the
ArkVale-style baseline's one copy per page and head).

``memcpy`` is injectable: the CPU tests pass a ``ctypes.memmove``-based function and check the
address arithmetic against a plain-torch copy.
"""

from __future__ import annotations

import ctypes
import logging

import torch

logger = logging.getLogger(__name__)

_H2D = 1  # cudaMemcpyHostToDevice
_CUDART = None


def cudart():
    """The CUDA runtime library torch uses (``ctypes.CDLL``), or ``None`` if it cannot be found."""
    global _CUDART
    if _CUDART is None:
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
            try:
                lib = ctypes.CDLL(name)
                fn = lib.cudaMemcpyAsync
            except (OSError, AttributeError):
                continue
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            fn.restype = ctypes.c_int
            fn2 = lib.cudaMemcpy2DAsync  # dst, dpitch, src, spitch, width, height, kind, stream
            fn2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                            ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            fn2.restype = ctypes.c_int
            _CUDART = lib
            break
        else:
            _CUDART = False
    return _CUDART or None


def cuda_memcpy_h2d(stream: int):
    """A ``memcpy(dst, src, nbytes)`` issuing ``cudaMemcpyAsync`` host-to-device on ``stream``
    (a ``cudaStream_t`` as int); raises if the runtime is unavailable or a call fails."""
    lib = cudart()
    if lib is None:
        raise RuntimeError("the CUDA runtime library (libcudart) was not found in this process")
    fn = lib.cudaMemcpyAsync

    def memcpy(dst: int, src: int, nbytes: int) -> None:
        rc = fn(dst, src, nbytes, _H2D, stream)
        if rc != 0:
            raise RuntimeError(f"cudaMemcpyAsync failed with CUDA error {rc}")

    return memcpy


def cuda_memcpy2d_h2d(stream: int):
    """A ``memcpy2d(dst, dpitch, src, spitch, width, height)`` issuing ``cudaMemcpy2DAsync``
    host-to-device on ``stream``; raises if the runtime is unavailable or a call fails."""
    lib = cudart()
    if lib is None:
        raise RuntimeError("the CUDA runtime library (libcudart) was not found in this process")
    fn = lib.cudaMemcpy2DAsync

    def memcpy2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        rc = fn(dst, dpitch, src, spitch, width, height, _H2D, stream)
        if rc != 0:
            raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {rc}")

    return memcpy2d


class PieceCopier:
    """Copy contiguous ``[P, D]`` blocks ``src[page, head]`` into rows of a contiguous staging buffer.

    Args:
        src: host store of one layer, K or V, ``[n_pages, Hkv, P, D]`` (pages and heads may be
            strided, each ``[P, D]`` block contiguous).
        dst: staging buffer ``[chunk, P, D]``, contiguous.
    """

    @staticmethod
    def copy(src: torch.Tensor, dst: torch.Tensor, pages: list[int], heads: list[int], memcpy) -> None:
        """``dst[j] = src[pages[j], heads[j]]`` for every ``j``, one ``memcpy`` per block."""
        if src.stride(3) != 1 or src.stride(2) != src.shape[3]:
            raise ValueError("each [P, D] block of the host store must be contiguous")
        if not dst.is_contiguous():
            raise ValueError("the staging buffer must be contiguous")
        if len(pages) > dst.shape[0]:
            raise ValueError(f"{len(pages)} blocks do not fit a staging buffer of {dst.shape[0]}")
        el = src.element_size()
        block = src.shape[2] * src.shape[3] * el
        s0, sp, sh = src.data_ptr(), src.stride(0) * el, src.stride(1) * el
        d0, dr = dst.data_ptr(), dst.stride(0) * el
        for j, (p, h) in enumerate(zip(pages, heads)):
            memcpy(d0 + j * dr, s0 + p * sp + h * sh, block)

    @staticmethod
    def copy_to_slots(src: torch.Tensor, ws: torch.Tensor, pages: list[int], slots: list[int], heads: list[int],
                      memcpy2d) -> None:
        """``ws[slots[j], :, heads[j], :] = src[pages[j], heads[j]]``, one 2-D ``memcpy2d`` per block.

        ``src [n_pages, Hkv, P, D]`` (each ``[P, D]`` block contiguous), ``ws [slots, P, Hkv, D]``
        (NHD working-set slots; rows of a head are ``D`` elements every ``Hkv * D``).
        """
        if src.stride(3) != 1 or src.stride(2) != src.shape[3]:
            raise ValueError("each [P, D] block of the host store must be contiguous")
        if ws.stride(3) != 1:
            raise ValueError("working-set rows must be contiguous along the head dimension")
        el = src.element_size()
        rows, width = src.shape[2], src.shape[3] * el
        s0, sp, sh = src.data_ptr(), src.stride(0) * el, src.stride(1) * el
        w0, ws_slot, ws_row, ws_head = ws.data_ptr(), ws.stride(0) * el, ws.stride(1) * el, ws.stride(2) * el
        for p, slot, h in zip(pages, slots, heads):
            memcpy2d(w0 + slot * ws_slot + h * ws_head, ws_row, s0 + p * sp + h * sh, width, width, rows)
