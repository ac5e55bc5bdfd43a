"""Attention references: sparse over all pages == dense; paged == dense over the same tokens."""

import pytest
import torch

from freekv_sglang.algorithm import dense_attention, paged_attention, sparse_attention


def brute_attention(q, k, v, scale, tokens_per_head):
    """Per KV head, softmax over the listed token indices (float64)."""
    hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.empty(hq, d, dtype=torch.float64)
    for h in range(hq):
        idx = torch.tensor(sorted(tokens_per_head[h // g]), dtype=torch.long)
        kk, vv = k[idx, h // g].double(), v[idx, h // g].double()
        w = torch.softmax(kk @ q[h].double() * scale, dim=0)
        out[h] = w @ vv
    return out


@pytest.mark.parametrize("group", [1, 3, 4, 7])
@pytest.mark.parametrize("n", [1, 31, 32, 100])
def test_sparse_over_all_pages_equals_dense(group, n):
    g = torch.Generator().manual_seed(n * 10 + group)
    hkv, d, p = 2, 16, 8
    q = torch.randn(hkv * group, d, generator=g)
    k, v = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
    n_pages = -(-n // p)
    pages = torch.arange(n_pages).expand(hkv, -1)
    dense = dense_attention(q, k, v, 0.25)
    assert dense.shape == (hkv * group, d) and dense.dtype == torch.float32
    torch.testing.assert_close(sparse_attention(q, k, v, pages, p, 0.25), dense, rtol=0, atol=0)
    # -1 padding, duplicates and pages past the history change nothing
    extra = torch.tensor([[-1, 0, n_pages + 3]] * hkv)
    torch.testing.assert_close(sparse_attention(q, k, v, torch.cat([pages, extra], 1), p, 0.25), dense,
                               rtol=0, atol=0)
    torch.testing.assert_close(dense.double(), brute_attention(q, k, v, 0.25, [range(n)] * hkv),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_attention_per_head_subsets(dtype):
    g = torch.Generator().manual_seed(9)
    hkv, group, d, p, n = 3, 3, 16, 4, 50
    q = torch.randn(hkv * group, d, generator=g).to(dtype)
    k, v = torch.randn(n, hkv, d, generator=g).to(dtype), torch.randn(n, hkv, d, generator=g).to(dtype)
    pages = torch.tensor([[0, 3, 12, -1], [1, 2, 5, 9], [12, -1, -1, -1]])
    out = sparse_attention(q, k, v, pages, p, 0.3)
    assert out.dtype == torch.float32
    toks = [[t for t in range(n) if t // p in set(row.tolist())] for row in pages]
    torch.testing.assert_close(out.double(), brute_attention(q, k, v, 0.3, toks), rtol=1e-5, atol=1e-5)


def test_paged_attention_equals_dense_over_the_same_tokens():
    g = torch.Generator().manual_seed(2)
    hkv, group, d, p, n_slots = 2, 4, 16, 8, 12
    k_slots = torch.randn(n_slots, p, hkv, d, generator=g)
    v_slots = torch.randn(n_slots, p, hkv, d, generator=g)
    q = torch.randn(3, hkv * group, d, generator=g)
    tables = [[3, 0, 7], [11], [5, 1, 2, 9, 4]]
    lasts = [5, 8, 1]
    out = paged_attention(q, k_slots, v_slots, tables, lasts, 0.2)
    assert out.shape == (3, hkv * group, d)
    for b, (slots, last) in enumerate(zip(tables, lasts)):
        k = torch.cat([k_slots[s] for s in slots[:-1]] + [k_slots[slots[-1], :last]])
        v = torch.cat([v_slots[s] for s in slots[:-1]] + [v_slots[slots[-1], :last]])
        assert k.shape[0] == (len(slots) - 1) * p + last
        torch.testing.assert_close(out[b], dense_attention(q[b], k, v, 0.2), rtol=0, atol=0)
        torch.testing.assert_close(out[b].double(), brute_attention(q[b], k, v, 0.2, [range(k.shape[0])] * hkv),
                                   rtol=1e-5, atol=1e-5)
