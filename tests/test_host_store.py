"""The host tier's buffer: the parallel anonymous mapping and the store's views (CPU; pinning is a GPU test)."""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.runtime import host_store
from freekv_sglang.runtime.host_store import HostKVStore, map_host_memory


@pytest.mark.parametrize("nbytes,threads", [(1, 1), (4096 * 3 + 5, 2), (5 * 2**20 + 123, 4), (64 * 2**20, 16)])
def test_mapping_is_zeroed_writable_and_exact(nbytes, threads):
    t = map_host_memory(nbytes, threads)
    assert t.dtype == torch.uint8 and t.numel() == nbytes and t.is_contiguous()
    assert int(t.count_nonzero()) == 0
    g = torch.Generator().manual_seed(nbytes)
    data = torch.randint(1, 256, (nbytes,), generator=g, dtype=torch.uint8)
    t.copy_(data)
    assert torch.equal(t, data)
    as_bf16 = t[: nbytes // 2 * 2].view(torch.bfloat16)  # the store views it in the KV dtype
    assert as_bf16.numel() == nbytes // 2


def test_mapping_rejects_empty():
    with pytest.raises(ValueError, match="positive"):
        map_host_memory(0)


def test_pageable_store_views_layers_and_halves():
    s = HostKVStore(n_layers=3, n_pages=5, n_kv_heads=2, page_size=8, head_dim=16, dtype=torch.float16, pin=False)
    assert s.allocator == "pageable" and s.buffer.shape == (3, 2, 5, 2, 8, 16)
    assert s.nbytes == 3 * 2 * 5 * 2 * 8 * 16 * 2
    s.k(1).fill_(1.5)
    s.v(1).fill_(-2.0)
    assert float(s.buffer[1, 0].mean()) == 1.5 and float(s.buffer[1, 1].mean()) == -2.0
    s.close()
    s.close()  # idempotent
    assert s.buffer is None


def test_unknown_allocator_is_refused():
    with pytest.raises(ValueError, match="FREEKV_HOST_ALLOC"):
        host_store._allocate((2, 3), torch.bfloat16, pin=True, how="cudaHostAlloc")
