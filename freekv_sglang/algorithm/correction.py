"""Fine-grained correction: which KV heads must not trust the speculative selection.

Speculative retrieval lets step ``t`` attend over pages selected with the previous step's
query ``q_{t-1}`` (same layer). For each KV head, the mean over its ``G`` query heads of
``cos(q_t, q_{t-1})`` is compared with a threshold ``tau``; heads below it are reselected
with ``q_t`` before attention. A request with no previous query (its first decode step)
is corrected on every head.
"""

from __future__ import annotations

import torch


def query_similarity(q: torch.Tensor, q_prev: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Mean cosine similarity per KV head.

    Args:
        q, q_prev: ``[B, Hq, D]``.
    Returns:
        float32 ``[B, Hkv]``.
    """
    qf, pf = q.float(), q_prev.float()
    cos = (qf * pf).sum(-1) / (qf.norm(dim=-1) * pf.norm(dim=-1)).clamp_min(1e-12)
    b, hq = cos.shape
    return cos.view(b, n_kv_heads, hq // n_kv_heads).mean(dim=-1)


def correction_flags(q: torch.Tensor, q_prev: torch.Tensor, prev_valid: torch.Tensor,
                     n_kv_heads: int, tau: float | None) -> torch.Tensor:
    """Bool ``[B, Hkv]``: heads to reselect with the current query before attention.

    Args:
        q, q_prev: ``[B, Hq, D]`` current and previous post-RoPE queries.
        prev_valid: bool ``[B]``, False where the request has no previous query.
        tau: threshold in [-1, 1], or ``None`` for correction off (only requests without a
            previous query are then reselected).
    """
    no_prev = ~prev_valid.bool()[:, None].expand(-1, n_kv_heads)
    if tau is None:
        return no_prev.clone()
    return (query_similarity(q, q_prev, n_kv_heads) < tau) | no_prev
