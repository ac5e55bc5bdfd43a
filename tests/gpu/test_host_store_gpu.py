"""The host tier pinned by each allocator, read by the UVA gather recall and by copy engines."""

from __future__ import annotations

import pytest
import torch

import freekv_sglang.kernels as K
from freekv_sglang.runtime import host_store
from freekv_sglang.runtime.host_store import HostKVStore


@pytest.mark.parametrize("allocator", ["parallel", "sglang"])
def test_pinned_tier_is_read_by_the_gather_recall(allocator, monkeypatch):
    if allocator == "sglang":
        pytest.importorskip("sglang.srt.mem_cache.pool_host.common")
    monkeypatch.setenv(host_store.HOST_ALLOC_ENV, allocator)
    L, n_pages, hkv, P, D = 2, 300, 8, 32, 128
    s = HostKVStore(L, n_pages, hkv, P, D, torch.bfloat16, pin=True)
    assert s.allocator == allocator and s.buffer.is_pinned()
    g = torch.Generator().manual_seed(7)
    s.buffer.copy_(torch.randn(s.buffer.shape, generator=g).to(torch.bfloat16))
    n = 96
    page = torch.randint(1, n_pages, (n,), generator=g).cuda()
    head = torch.randint(0, hkv, (n,), generator=g).cuda()
    slot = torch.randperm(2 * n, generator=g)[:n].cuda()
    for layer in range(L):
        ws = [torch.randn(2 * n, P, hkv, D, device="cuda").to(torch.bfloat16) for _ in range(2)]
        want = [w.clone() for w in ws]
        hk, hv = s.k(layer).cuda(non_blocking=True), s.v(layer).cuda(non_blocking=True)  # copy-engine read
        K.recall_reference(hk, hv, want[0], want[1], page, slot, head)
        K.recall_gather(s.k(layer), s.v(layer), ws[0], ws[1], page, slot, head)  # kernel reads host memory
        torch.cuda.synchronize()
        assert torch.equal(ws[0], want[0]) and torch.equal(ws[1], want[1])
    # the last page of the buffer is reachable too (the mapping is not shorter than the tier)
    last = torch.full((1,), n_pages - 1, dtype=torch.int64, device="cuda")
    h = torch.zeros(1, dtype=torch.int64, device="cuda")
    ws = [torch.zeros(1, P, hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    K.recall_gather(s.k(L - 1), s.v(L - 1), ws[0], ws[1], last, h[:1].clone(), h)
    torch.cuda.synchronize()
    assert torch.equal(ws[1][0, :, 0].cpu(), s.v(L - 1)[n_pages - 1, 0])
    s.close()
