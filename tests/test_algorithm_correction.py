"""Correction flags: per-KV-head mean cosine of consecutive queries vs. tau."""

import pytest
import torch

from freekv_sglang.algorithm import correction_flags, query_similarity


def brute_flags(q, qp, prev_valid, hkv, tau):
    b, hq, _ = q.shape
    g = hq // hkv
    out = torch.zeros(b, hkv, dtype=torch.bool)
    for bi in range(b):
        for k in range(hkv):
            if not prev_valid[bi]:
                out[bi, k] = True
                continue
            if tau is None:
                continue
            cos = []
            for h in range(k * g, (k + 1) * g):
                a, c = q[bi, h].double(), qp[bi, h].double()
                cos.append(float(a @ c / (a.norm() * c.norm())))
            out[bi, k] = sum(cos) / g < tau
    return out


@pytest.mark.parametrize("group", [1, 3, 4, 7])
@pytest.mark.parametrize("tau", [None, -1.0, 0.0, 0.5, 0.8, 0.9, 1.0])
def test_correction_flags_match_brute_force(group, tau):
    g = torch.Generator().manual_seed(group)
    hkv, d, b = 3, 16, 6
    qp = torch.randn(b, hkv * group, d, generator=g)
    # a spread of similarities, from near-identical (cos ~0.9999) to unrelated; not exactly
    # identical, where float32 rounding decides a comparison with tau = 1.0
    mix = torch.linspace(0.01, 1.5, b)[:, None, None]
    q = qp + mix * torch.randn(b, hkv * group, d, generator=g)
    prev_valid = torch.tensor([True, True, False, True, True, True])
    got = correction_flags(q, qp, prev_valid, hkv, tau)
    assert got.shape == (b, hkv) and got.dtype == torch.bool
    assert torch.equal(got, brute_flags(q, qp, prev_valid, hkv, tau))


def test_sign_flip_on_one_kv_head_flags_that_head_only():
    g = torch.Generator().manual_seed(42)
    hkv, group, d = 3, 2, 32
    q_prev = torch.randn(1, hkv * group, d, generator=g)
    q = q_prev + 0.05 * torch.randn(1, hkv * group, d, generator=g)  # small drift: cos ~ 0.999
    q[0, 2:4] = -q_prev[0, 2:4]  # KV head 1's query heads flip sign
    sim = query_similarity(q, q_prev, hkv)
    assert sim[0, 0] > 0.99 and sim[0, 2] > 0.99 and sim[0, 1] < -0.99
    for tau in (0.8, 0.9):
        flags = correction_flags(q, q_prev, torch.tensor([True]), hkv, tau)
        assert flags.tolist() == [[False, True, False]]


def test_first_step_flags_every_head():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 16, generator=g)
    for tau in (None, -1.0, 0.9):
        flags = correction_flags(q, q.clone(), torch.tensor([False, True]), 4, tau)
        assert flags[0].all()
        assert not flags[1].any()  # identical queries: cos 1 >= tau (and tau=None never flags)


def test_tau_none_flags_only_rows_without_previous_query():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 6, 8, generator=g)
    q_prev = -q  # maximally different
    flags = correction_flags(q, q_prev, torch.tensor([True, False, True]), 2, None)
    assert flags.tolist() == [[False, False], [True, True], [False, False]]


def test_query_similarity_is_mean_over_the_group():
    g = torch.Generator().manual_seed(5)
    q, qp = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    cos = torch.nn.functional.cosine_similarity(q, qp, dim=-1)
    torch.testing.assert_close(query_similarity(q, qp, 2), cos.view(2, 2, 3).mean(-1))
    torch.testing.assert_close(query_similarity(q.bfloat16(), qp.bfloat16(), 2),
                               torch.nn.functional.cosine_similarity(q.bfloat16().float(), qp.bfloat16().float(), dim=-1)
                               .view(2, 2, 3).mean(-1))
