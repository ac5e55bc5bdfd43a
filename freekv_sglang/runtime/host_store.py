"""Host tier: the full KV cache of every running request, in pinned CPU memory, HND pages.

One buffer ``[L, 2, n_pages, Hkv, P, D]`` (K at index 0, V at 1). A (layer, page, head)
is one contiguous ``P * D`` block, which is what a recall moves. Token slot ``loc``
(SGLang's KV index) lives in page ``loc // P`` at offset ``loc % P``; page 0 is the
padding page that absorbs writes of padded batch entries.

On a CUDA machine the buffer is page-locked with ``cudaHostRegister`` (through SGLang's
own helper, which avoids the caching host allocator's power-of-two rounding) so that GPU
kernels can read and write it directly.
"""

from __future__ import annotations

import logging
import weakref

import torch

logger = logging.getLogger(__name__)


def _allocate(shape: tuple, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    if not pin:
        return torch.empty(shape, dtype=dtype)
    try:
        from sglang.srt.mem_cache.pool_host.common import HostTensorAllocator, alloc_with_host_register
    except ImportError:  # SGLang absent (kernel tests, tools): torch's pinned allocator
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    return alloc_with_host_register(shape, dtype, "cpu", True, HostTensorAllocator())


class HostKVStore:
    """Pinned HND page store for all layers.

    Args:
        n_layers, n_pages, n_kv_heads, page_size, head_dim: sizes (``n_pages`` includes page 0).
        dtype: KV dtype.
        pin: page-lock the buffer (needs CUDA).
    """

    def __init__(self, n_layers: int, n_pages: int, n_kv_heads: int, page_size: int, head_dim: int,
                 dtype: torch.dtype, pin: bool):
        self.shape = (n_layers, 2, n_pages, n_kv_heads, page_size, head_dim)
        self.n_pages = n_pages
        self.page_size = page_size
        self.pinned = pin
        self.buffer = _allocate(self.shape, dtype, pin)
        # unpin before the memory goes back to the OS: a later allocation at the same address
        # could otherwise not be registered again
        self._finalizer = weakref.finalize(self, _release, self.buffer, pin)
        logger.info("FreeKV host KV store: %d pages x %d layers, %.2f GiB %s", n_pages, n_layers,
                    self.nbytes / 2**30, "pinned" if pin else "pageable")

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def k(self, layer: int) -> torch.Tensor:
        """``[n_pages, Hkv, P, D]`` keys of one layer (a view)."""
        return self.buffer[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.buffer[layer, 1]

    def close(self):
        """Unpin and drop the buffer (idempotent)."""
        self._finalizer()
        self.buffer = None


def _release(buffer: torch.Tensor, pinned: bool) -> None:
    if not pinned:
        return
    try:
        from sglang.srt.mem_cache.pool_host.common import _cuda_host_unregister
    except ImportError:  # allocated by torch's pinned allocator, which frees it itself
        return
    _cuda_host_unregister(buffer)
