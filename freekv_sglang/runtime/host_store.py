"""Host tier: the full KV cache of every running request, in pinned CPU memory, HND pages.

One buffer ``[L, 2, n_pages, Hkv, P, D]`` (K at index 0, V at 1). A (layer, page, head)
is one contiguous ``P * D`` block, which is what a recall moves. Token slot ``loc``
(SGLang's KV index) lives in page ``loc // P`` at offset ``loc % P``; page 0 is the
padding page that absorbs writes of padded batch entries.

On a CUDA machine the buffer is page-locked with ``cudaHostRegister`` so that GPU kernels can
read and write it directly. By default it is an anonymous mapping faulted in by many threads
(:func:`map_host_memory`, then ``cudaHostRegister``: about 30x faster than one thread);
``FREEKV_HOST_ALLOC=sglang`` takes SGLang's host-pool allocator instead (one thread populates it),
and the default falls back to it if the mapping or its page-locking fails. Neither goes through the
caching host allocator, which would round the size up to a power of two.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

from freekv_sglang import compat
from freekv_sglang.settings import env_name, load_settings

logger = logging.getLogger(__name__)

HOST_ALLOC_ENV = env_name("host_alloc")
_HUGE = 2 * 2**20


def map_host_memory(nbytes: int, threads: int | None = None) -> torch.Tensor:
    """Anonymous private mapping of at least ``nbytes``, every page faulted in by ``threads`` threads.

    Returns a ``uint8`` tensor of exactly ``nbytes`` over the mapping (the tensor keeps it alive).
    The mapping is marked ``MADV_DONTFORK`` (a process forked later, e.g. for a compiler, neither
    copies nor shares the pages, which stay pinned in this process) and ``MADV_HUGEPAGE`` (2 MiB
    pages where the kernel's transparent huge pages allow: 512x fewer faults and page-table entries
    for the later page-locking). Faulting in parallel is what makes a large tier start quickly: a
    single thread populates well under the memory bandwidth.
    """
    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    size = -(-nbytes // _HUGE) * _HUGE
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    for advice in ("MADV_DONTFORK", "MADV_HUGEPAGE"):
        if hasattr(mmap, advice):
            try:
                mm.madvise(getattr(mmap, advice))
            except OSError:  # e.g. huge pages disabled: a hint, not a requirement
                pass
    t = torch.frombuffer(mm, dtype=torch.uint8)
    threads = max(1, min(threads or os.cpu_count() or 1, 32))
    step = 4096  # one write per base page: huge or not, every page is faulted once
    chunk = -(-size // (threads * _HUGE)) * _HUGE
    parts = [t[i:i + chunk] for i in range(0, size, chunk)]
    with ThreadPoolExecutor(max_workers=threads) as pool:  # torch releases the GIL inside fill_
        list(pool.map(lambda part: part[::step].fill_(0), parts))
    return t[:nbytes]


def _register(t: torch.Tensor) -> None:
    cudart = torch.cuda.cudart()
    rc = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(rc) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {cudart.cudaGetErrorString(rc)} (rc={int(rc)})")


def _unregister(t: torch.Tensor) -> None:
    rc = torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
    if int(rc) != 0:
        logger.warning("cudaHostUnregister of the FreeKV host tier failed (rc=%d)", int(rc))


def _allocate(shape: tuple, dtype: torch.dtype, pin: bool, how: str) -> tuple[torch.Tensor, str]:
    """The host buffer and how it was made: ``"pageable"``, ``"parallel"`` (:func:`map_host_memory` +
    ``cudaHostRegister``), ``"sglang"`` (SGLang's host-pool allocator + ``cudaHostRegister``) or
    ``"torch"`` (``pin_memory=True``, when SGLang is absent)."""
    if not pin:
        return torch.empty(shape, dtype=dtype), "pageable"
    if how not in ("parallel", "sglang"):
        raise ValueError(f"unknown host allocator {how!r} ({HOST_ALLOC_ENV}: parallel or sglang)")
    if how == "parallel":
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        try:
            raw = map_host_memory(nbytes)
            _register(raw)
            return raw.view(dtype).view(shape), "parallel"
        except (OSError, RuntimeError) as e:
            logger.warning("FreeKV host tier: parallel mapping failed (%s); falling back to SGLang's allocator", e)
    try:
        alloc, _ = compat.host_register_fns()
    except ImportError:  # SGLang absent (kernel tests, tools): torch's pinned allocator
        return torch.empty(shape, dtype=dtype, pin_memory=True), "torch"
    return alloc(shape, dtype), "sglang"


class HostKVStore:
    """Pinned HND page store for all layers.

    Args:
        n_layers, n_pages, n_kv_heads, page_size, head_dim: sizes (``n_pages`` includes page 0).
        dtype: KV dtype.
        pin: page-lock the buffer (needs CUDA).
        alloc: how a pinned buffer is made, ``"parallel"`` or ``"sglang"`` (default: ``FREEKV_HOST_ALLOC``).
    """

    def __init__(self, n_layers: int, n_pages: int, n_kv_heads: int, page_size: int, head_dim: int,
                 dtype: torch.dtype, pin: bool, alloc: str | None = None):
        self.shape = (n_layers, 2, n_pages, n_kv_heads, page_size, head_dim)
        self.n_pages = n_pages
        self.page_size = page_size
        self.pinned = pin
        t0 = time.perf_counter()
        self.buffer, self.allocator = _allocate(self.shape, dtype, pin, alloc or load_settings().host_alloc)
        # unpin before the memory goes back to the OS: a later allocation at the same address
        # could otherwise not be registered again
        self._finalizer = weakref.finalize(self, _release, self.buffer, self.allocator)
        logger.info("FreeKV host KV store: %d pages x %d layers, %.2f GiB %s (%s, %.1f s)", n_pages, n_layers,
                    self.nbytes / 2**30, "pinned" if pin else "pageable", self.allocator, time.perf_counter() - t0)

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


def _release(buffer: torch.Tensor, allocator: str) -> None:
    if allocator == "parallel":
        _unregister(buffer)
    elif allocator == "sglang":
        compat.host_register_fns()[1](buffer)
    # "torch": the caching host allocator frees it; "pageable": nothing to undo
