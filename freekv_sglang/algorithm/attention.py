"""Attention references: dense, per-head page subsets, and paged over working-set slots."""

from __future__ import annotations

import torch


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token over a whole history.

    Args:
        q: ``[Hq, D]``; k, v: ``[n, Hkv, D]``.
    Returns:
        float32 ``[Hq, D]``.
    """
    hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qf = q.float().view(hkv, g, d)
    logits = torch.einsum("hgd,nhd->hgn", qf, k.float()) * scale
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("hgn,nhd->hgd", p, v.float()).reshape(hq, d)


def page_token_mask(pages: torch.Tensor, n_tokens: int, page_size: int) -> torch.Tensor:
    """Bool ``[Hkv, n_tokens]``: token ``i`` lies in one of head ``h``'s pages (-1 ignored)."""
    tok_page = torch.arange(n_tokens, device=pages.device) // page_size
    return (tok_page[None, :, None] == pages[:, None, :]).any(-1)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor,
                     page_size: int, scale: float) -> torch.Tensor:
    """Each KV head attends over its own set of pages of the history.

    Args:
        q: ``[Hq, D]``; k, v: ``[n, Hkv, D]`` full history (tokens past ``n`` don't exist).
        pages: int ``[Hkv, m]`` logical pages visible to each KV head (-1 = none).
    Returns:
        float32 ``[Hq, D]``.
    """
    hq, d = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    mask = page_token_mask(pages, n, page_size)  # [Hkv, n]
    qf = q.float().view(hkv, g, d)
    logits = torch.einsum("hgd,nhd->hgn", qf, k.float()) * scale
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("hgn,nhd->hgd", p, v.float()).reshape(hq, d)


def paged_attention(q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor,
                    page_tables: list[list[int]], last_page_lens: list[int], scale: float) -> torch.Tensor:
    """Decode attention over paged KV (what FlashInfer's paged decode computes).

    Args:
        q: ``[B, Hq, D]``.
        k_slots, v_slots: ``[n_slots, P, Hkv, D]`` page slots (NHD pages).
        page_tables: per request, the slots to attend over; the last one holds
            ``last_page_lens[b]`` tokens, the others are full.
    Returns:
        float32 ``[B, Hq, D]``.
    """
    outs = []
    p_sz = k_slots.shape[1]
    for b, (slots, last) in enumerate(zip(page_tables, last_page_lens)):
        idx = torch.as_tensor(slots, dtype=torch.long, device=k_slots.device)
        k = k_slots[idx].flatten(0, 1)
        v = v_slots[idx].flatten(0, 1)
        n = (len(slots) - 1) * p_sz + last
        outs.append(dense_attention(q[b], k[:n], v[:n], scale))
    return torch.stack(outs)
