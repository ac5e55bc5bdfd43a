"""Prefill with a cached prefix: the new tokens attend over prefix + themselves, exactly.

A prefill chunk (the next chunk of a chunked prefill, or the rest of a prompt whose prefix the radix
cache holds) has queries only for its ``T`` new tokens, at positions ``m .. m + T - 1`` after an
``m``-token prefix. The exact result is causal attention over all ``m + T`` keys. It splits into two
parts whose softmax states merge exactly (log-sum-exp): the new tokens over themselves (causal) and
over the prefix (every prefix key is visible to every new token); the prefix part can itself be split
into blocks of pages, merged the same way. :func:`extend_attention` is the spec, :func:`attention_lse` and
:func:`merge_lse` are the pieces the runtime computes (with FlashInfer on the GPU).
"""

from __future__ import annotations

import torch


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``T`` queries over ``n`` keys with its log-sum-exp.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[n, Hkv, D]`` (``Hq`` a multiple of ``Hkv``).
        causal: query ``t`` sees keys ``j <= n - T + t`` (the queries are the last ``T`` keys' tokens).
    Returns:
        ``(o, lse)``: float32 ``[T, Hq, D]`` and float32 ``[T, Hq]`` (natural log; ``-inf`` and a zero
        output where a query sees no key).
    """
    t, hq, d = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    logits = torch.einsum("thgd,nhd->thgn", q.float().view(t, hkv, g, d), k.float()) * scale
    if causal:
        visible = torch.arange(n, device=q.device)[None, :] <= (n - t + torch.arange(t, device=q.device))[:, None]
        logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [T, Hkv, G]
    p = torch.exp(logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    o = torch.einsum("thgn,nhd->thgd", p, v.float())
    return o.reshape(t, hq, d), lse.reshape(t, hq)


def merge_lse(o_a: torch.Tensor, s_a: torch.Tensor, o_b: torch.Tensor,
              s_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states over disjoint key sets: ``o [T, H, D]``, ``s [T, H]`` (natural log)."""
    s = torch.logaddexp(s_a, s_b)
    safe = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    w_a = torch.exp(s_a - safe)[..., None]
    w_b = torch.exp(s_b - safe)[..., None]
    return o_a * w_a + o_b * w_b, s


def extend_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_prefix: torch.Tensor,
                     v_prefix: torch.Tensor, scale: float) -> torch.Tensor:
    """The spec: ``T`` new tokens (``q [T, Hq, D]``, ``k_new, v_new [T, Hkv, D]``) over an ``m``-token prefix
    (``k_prefix, v_prefix [m, Hkv, D]``) and themselves, causally. Returns float32 ``[T, Hq, D]``."""
    k = torch.cat([k_prefix, k_new])
    v = torch.cat([v_prefix, v_new])
    return attention_lse(q, k, v, scale, causal=True)[0]
