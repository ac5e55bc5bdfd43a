"""Quest scores and GQA aggregation vs. brute force."""

import math

import pytest
import torch

from freekv_sglang.algorithm import AGGREGATIONS, aggregate_gqa, page_digests, quest_scores

GROUPS = [1, 3, 4, 7]


def brute_scores(q, dig):
    b, hq, d = q.shape
    np_, hkv = dig.shape[1], dig.shape[2]
    g = hq // hkv
    out = torch.empty(b, hq, np_)
    for bi in range(b):
        for h in range(hq):
            for p in range(np_):
                s = 0.0
                for c in range(d):
                    qv = q[bi, h, c].item()
                    s += max(qv * dig[bi, p, h // g, 0, c].item(), qv * dig[bi, p, h // g, 1, c].item())
                out[bi, h, p] = s
    return out


def _digests(g, b, np_, hkv, d, dtype=torch.float32):
    a = torch.randn(b, np_, hkv, d, generator=g)
    c = torch.randn(b, np_, hkv, d, generator=g)
    return torch.stack([torch.maximum(a, c), torch.minimum(a, c)], dim=3).to(dtype)


@pytest.mark.parametrize("group", GROUPS)
def test_quest_scores_match_brute_force(group):
    g = torch.Generator().manual_seed(group)
    hkv, d = 2, 8
    q = torch.randn(2, hkv * group, d, generator=g)
    dig = _digests(g, 2, 5, hkv, d)
    got = quest_scores(q, dig)
    assert got.dtype == torch.float32 and got.shape == (2, hkv * group, 5)
    torch.testing.assert_close(got, brute_scores(q, dig), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quest_scores_low_precision_inputs_upcast(dtype):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 6, 16, generator=g).to(dtype)
    dig = _digests(g, 1, 7, 2, 16, dtype)
    got = quest_scores(q, dig)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, brute_scores(q.float(), dig.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", GROUPS)
def test_quest_score_bounds_every_key_of_the_page(group):
    g = torch.Generator().manual_seed(100 + group)
    hkv, d, page, n_pages = 3, 32, 16, 6
    keys = 2 * torch.randn(n_pages * page, hkv, d, generator=g)
    q = torch.randn(1, hkv * group, d, generator=g)
    s = quest_scores(q, page_digests(keys, page)[None])[0]  # [Hq, Np]
    dots = torch.einsum("hd,nhd->hn", q[0], keys.repeat_interleave(group, dim=1))  # [Hq, n]
    per_page_max = dots.view(hkv * group, n_pages, page).amax(-1)
    assert bool((s >= per_page_max - 1e-4).all())
    # The bound is tight for one-token pages.
    s1 = quest_scores(q, page_digests(keys, 1)[None])[0]
    torch.testing.assert_close(s1, dots, rtol=1e-5, atol=1e-4)


def brute_aggregate(scores, hkv, mode, valid, head_dim):
    b, hq, np_ = scores.shape
    g = hq // hkv
    out = torch.full((b, hkv, np_), float("-inf"))
    for bi in range(b):
        idx = [p for p in range(np_) if valid[bi, p]]
        for k in range(hkv):
            heads = range(k * g, (k + 1) * g)
            for p in idx:
                if mode == "mean":
                    out[bi, k, p] = sum(scores[bi, h, p].item() for h in heads) / g
                elif mode == "max":
                    out[bi, k, p] = max(scores[bi, h, p].item() for h in heads)
                else:
                    acc = 0.0
                    for h in heads:
                        z = [scores[bi, h, j].item() / math.sqrt(head_dim) for j in idx]
                        m = max(z)
                        acc += math.exp(scores[bi, h, p].item() / math.sqrt(head_dim) - m) / sum(math.exp(x - m) for x in z)
                    out[bi, k, p] = acc / g
    return out


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("group", GROUPS)
def test_aggregate_gqa_matches_brute_force(mode, group):
    g = torch.Generator().manual_seed(10 * AGGREGATIONS.index(mode) + group)
    hkv, np_, d = 2, 9, 64
    scores = 10 * torch.randn(3, hkv * group, np_, generator=g)
    valid = torch.rand(3, np_, generator=g) < 0.6
    valid[0] = True
    valid[2] = False  # a request with no candidate at all
    got = aggregate_gqa(scores, hkv, mode, valid, head_dim=d)
    want = brute_aggregate(scores, hkv, mode, valid, d)
    assert got.shape == (3, hkv, np_) and got.dtype == torch.float32
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert bool((got[~valid[:, None, :].expand_as(got)] == float("-inf")).all())
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-6)


def test_aggregate_gqa_valid_none_means_all_valid():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(1, 6, 4, generator=g)
    for mode in AGGREGATIONS:
        a = aggregate_gqa(s, 2, mode, None, head_dim=16)
        b = aggregate_gqa(s, 2, mode, torch.ones(1, 4, dtype=torch.bool), head_dim=16)
        assert torch.equal(a, b) and bool(torch.isfinite(a).all())


def test_aggregate_gqa_errors():
    s = torch.randn(1, 4, 3)
    with pytest.raises(ValueError):
        aggregate_gqa(s, 2, "softmax-mean")  # needs head_dim
    with pytest.raises(ValueError):
        aggregate_gqa(s, 2, "median")
