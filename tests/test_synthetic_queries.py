"""Benchmark-only synthetic query locality: consecutive replaced queries have the requested cosine."""

import pytest
import torch

from freekv_sglang.runtime.synthetic import SyntheticQueries


@pytest.mark.parametrize("cosine", [0.5, 0.9, 0.99])
def test_consecutive_queries_have_the_requested_cosine(cosine):
    sq = SyntheticQueries(n_layers=2, n_q_heads=16, head_dim=128, cosine=cosine, device="cpu")
    rows = torch.tensor([1, 5, 70])
    g = torch.Generator().manual_seed(1)
    q1 = sq.apply(1, torch.randn(3, 16, 128, generator=g) * 3, rows)
    q2 = sq.apply(1, torch.randn(3, 16, 128, generator=g) * 0.1, rows)
    cos = torch.nn.functional.cosine_similarity(q1, q2, dim=-1)
    assert abs(float(cos.mean()) - cosine) < 0.05
    assert q1.dtype == torch.float32 and q1.shape == (3, 16, 128)

