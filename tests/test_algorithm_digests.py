"""Page digests vs. a brute-force loop."""

import pytest
import torch

from freekv_sglang.algorithm import append_page_digest, page_digests

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def brute_digests(keys, page_size):
    n, hkv, d = keys.shape
    out = torch.empty(n // page_size, hkv, 2, d, dtype=keys.dtype)
    for p in range(n // page_size):
        for h in range(hkv):
            for c in range(d):
                vals = [keys[p * page_size + t, h, c].item() for t in range(page_size)]
                out[p, h, 0, c] = max(vals)
                out[p, h, 1, c] = min(vals)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,page_size", [(1, 32), (31, 32), (32, 32), (33, 32), (100, 32), (130, 8), (7, 1)])
def test_page_digests_match_brute_force(dtype, n, page_size):
    g = torch.Generator().manual_seed(1000 * n + page_size)
    keys = (3 * torch.randn(n, 3, 8, generator=g)).to(dtype)
    got = page_digests(keys, page_size)
    assert got.dtype == dtype
    assert got.shape == (n // page_size, 3, 2, 8)
    assert torch.equal(got, brute_digests(keys, page_size))


@pytest.mark.parametrize("dtype", DTYPES)
def test_partial_page_gets_no_digest(dtype):
    g = torch.Generator().manual_seed(7)
    keys = torch.randn(2 * 16 + 5, 2, 4, generator=g).to(dtype)
    d = page_digests(keys, 16)
    assert d.shape[0] == 2
    # Changing the tokens of the partial page changes nothing.
    keys2 = keys.clone()
    keys2[32:] = 100.0
    assert torch.equal(page_digests(keys2, 16), d)
    assert page_digests(keys[:15], 16).shape == (0, 2, 2, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_append_page_digest_token_by_token(dtype):
    g = torch.Generator().manual_seed(11)
    page_size = 8
    keys = torch.randn(70, 3, 16, generator=g).to(dtype)
    dig = page_digests(keys[:0], page_size)
    for n in range(1, keys.shape[0] + 1):
        new = append_page_digest(dig, keys[:n], page_size)
        assert torch.equal(new, page_digests(keys[:n], page_size)), n
        if n % page_size:
            assert new.shape[0] == dig.shape[0]
        else:
            assert new.shape[0] == dig.shape[0] + 1
        dig = new


def test_append_page_digest_several_pages_at_once_and_keeps_existing():
    g = torch.Generator().manual_seed(12)
    keys = torch.randn(100, 2, 4, generator=g)
    dig = page_digests(keys[:20], 8)  # 2 pages
    new = append_page_digest(dig, keys, 8)  # 12 pages: 10 appended
    assert torch.equal(new, page_digests(keys, 8))
    assert torch.equal(new[:2], dig)
    assert append_page_digest(new, keys, 8) is new
