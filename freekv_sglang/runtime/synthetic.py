"""Benchmark-only synthetic query locality (``FREEKV_BENCH_QUERY_COSINE``).

Speed benchmarks run models with random weights (``--load-format dummy``), whose consecutive
decode queries are unrelated: every KV head fails the correction check and most selected pages
change every step, FreeKV's worst case. Real models keep consecutive queries close (the
correction threshold exists because they usually are). To time the data path at a chosen
locality, this replaces each decode query by ``u + sigma * e``: ``u`` a fixed random direction per
(layer, request row, query head), ``e`` the model's own query normalised to the same length, so
consecutive queries of a head have cosine about ``c = 1 / (1 + sigma^2)``. Attention then uses
the replaced queries: **generated tokens are meaningless**; never set it when serving.
"""

from __future__ import annotations

import math

import torch

ROW_SLOTS = 64  # distinct directions per layer; rows share them modulo this


class SyntheticQueries:
    """Fixed directions ``[L, ROW_SLOTS, Hq, D]`` and the mixing of :func:`apply`."""

    def __init__(self, n_layers: int, n_q_heads: int, head_dim: int, cosine: float, device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(n_layers, ROW_SLOTS, n_q_heads, head_dim, generator=g)
        self.u = (torch.nn.functional.normalize(u, dim=-1) * math.sqrt(head_dim)).to(device)
        self.sigma = math.sqrt(1.0 / cosine - 1.0)
        self.cosine = cosine

    def apply(self, layer: int, q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``q [B, Hq, D]`` -> ``u[layer, rows % ROW_SLOTS] + sigma * sqrt(D) * q / |q|`` (q's dtype).
        One kernel on CUDA (:func:`freekv_sglang.kernels.synthetic_query.mix_queries`), CUDA-graph safe."""
        from freekv_sglang.kernels.synthetic_query import mix_queries

        return mix_queries(q, self.u[layer], rows, self.sigma)
