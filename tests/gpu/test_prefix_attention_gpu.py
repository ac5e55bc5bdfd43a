"""Prefill over a cached prefix on CUDA: the staging of prefix pages (copy-engine block copies of page runs,
the gather kernel for the rest, FP8 tiers widened, GPU-tier pages) and FlashInfer's paged prefill over the
staged HND pages, merged into the new tokens' attention, against the plain-torch spec."""

from __future__ import annotations

import pytest
import torch

from test_prefix_attention import _check_staged_prefix_attention, _runtime


def _gpu_runtime(g, alloc, dtype=torch.bfloat16, **kw):
    return _runtime(g, P=16, L=3, hkv=2, group=4, d=128, R=6, max_ctx=300, alloc=alloc, dtype=dtype, device="cuda",
                    **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("capacity", [64, 7])
@pytest.mark.parametrize("alloc,min_pages", [("scattered", 1), ("contiguous", 1), ("contiguous", 3),
                                             ("contiguous", 1000)])
def test_staged_prefix_attention_matches_the_spec_gpu(dtype, capacity, alloc, min_pages):
    g = torch.Generator().manual_seed(11)
    rt = _gpu_runtime(g, alloc, dtype)
    page_bytes = rt.shape.n_kv_heads * rt.layout.page_size * rt.shape.head_dim * 2
    pa = _check_staged_prefix_attention(rt, g, capacity, dma_min_bytes=min_pages * page_bytes)
    torch.cuda.synchronize()
    assert (pa.copied["dma"] > 0) == (min_pages <= 3)  # single pages too when min_pages is 1
    assert pa.copied["dma"] + pa.copied["gather"] == 2 * rt.shape.n_layers * 16 * page_bytes  # 16 prefix pages


def test_staged_prefix_reads_the_gpu_tier_gpu():
    g = torch.Generator().manual_seed(12)
    rt = _gpu_runtime(g, "contiguous", n_gpu_pages=60)
    pa = _check_staged_prefix_attention(rt, g, 64, rows=(3, 1, 5, 6), dma_min_bytes=1)
    assert any(first >= rt.host.n_pages for first, _, _ in pa.blocks[0].copies.runs)


def test_staged_prefix_from_an_fp8_tier_gpu():
    g = torch.Generator().manual_seed(13)
    rt = _gpu_runtime(g, "contiguous", kv_fp8=True)
    pa = _check_staged_prefix_attention(rt, g, 64, dma_min_bytes=1)
    assert pa.copied["dma"] == 0 and pa.copied["gather"] > 0
