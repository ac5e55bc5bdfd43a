"""Page scores: the Quest upper bound of ``q . k`` over a page, and its GQA aggregation.

For query head ``h`` (post-RoPE query ``q``) and a page with digest ``(mx, mn)`` of the
KV head that ``h`` reads::

    score[h, p] = sum_d max(q[h, d] * mx[p, d], q[h, d] * mn[p, d])

which bounds ``q . k`` for every key of the page from above. The ``G = Hq / Hkv`` query
heads of a KV head are combined into one score per KV head, so that each KV head selects
its own pages:

* ``mean``: arithmetic mean of the raw bounds;
* ``softmax-mean``: softmax over the candidate pages of each query head (scaled by
  ``1/sqrt(D)``), then the mean over the group;
* ``max``: maximum of the raw bounds over the group.

Query head ``h`` belongs to KV head ``h // G`` (the grouping every GQA kernel uses).
"""

from __future__ import annotations

import math

import torch

AGGREGATIONS = ("mean", "softmax-mean", "max")


def quest_scores(q: torch.Tensor, digests: torch.Tensor) -> torch.Tensor:
    """Per-query-head page bounds.

    Args:
        q: ``[B, Hq, D]`` queries.
        digests: ``[B, Np, Hkv, 2, D]`` page digests (max, min).
    Returns:
        float32 ``[B, Hq, Np]``.
    """
    b, hq, d = q.shape
    hkv = digests.shape[2]
    g = hq // hkv
    qf = q.float().view(b, hkv, g, 1, d)  # [B, Hkv, G, 1, D]
    mx = digests[:, :, :, 0].float().permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, Np, D]
    mn = digests[:, :, :, 1].float().permute(0, 2, 1, 3).unsqueeze(2)
    s = torch.maximum(qf * mx, qf * mn).sum(-1)  # [B, Hkv, G, Np]
    return s.reshape(b, hq, -1)


def aggregate_gqa(scores: torch.Tensor, n_kv_heads: int, mode: str, valid: torch.Tensor | None = None,
                  head_dim: int | None = None) -> torch.Tensor:
    """Combine the query heads of each KV head.

    Args:
        scores: float32 ``[B, Hq, Np]``.
        n_kv_heads: ``Hkv``.
        mode: one of :data:`AGGREGATIONS`.
        valid: bool ``[B, Np]`` candidate pages; others get ``-inf``. ``None``: all valid.
        head_dim: ``D`` for the softmax temperature (``softmax-mean`` only).
    Returns:
        float32 ``[B, Hkv, Np]``, ``-inf`` at invalid pages.
    """
    b, hq, np_ = scores.shape
    s = scores.view(b, n_kv_heads, hq // n_kv_heads, np_)
    if valid is None:
        valid = torch.ones(b, np_, dtype=torch.bool, device=scores.device)
    vmask = valid[:, None, None, :]
    if mode == "mean":
        out = s.mean(dim=2)
    elif mode == "max":
        out = s.amax(dim=2)
    elif mode == "softmax-mean":
        if head_dim is None:
            raise ValueError("softmax-mean aggregation needs head_dim")
        logits = (s / math.sqrt(head_dim)).masked_fill(~vmask, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        out = torch.nan_to_num(p, nan=0.0).mean(dim=2)
    else:
        raise ValueError(f"unknown GQA aggregation {mode!r}; choose one of {AGGREGATIONS}")
    return out.masked_fill(~valid[:, None, :], float("-inf"))
