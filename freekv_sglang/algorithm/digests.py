"""Page digests: the channel-wise bounding box of a page's post-RoPE keys.

For every full page and KV head the digest is ``(max_t k[t, d], min_t k[t, d])`` over the
page's ``P`` tokens, for each channel ``d`` (the Quest bound). Digests are kept in the KV
dtype: max and min of bf16 values are exact in bf16.
"""

from __future__ import annotations

import torch


def page_digests(keys: torch.Tensor, page_size: int) -> torch.Tensor:
    """Digests of every *full* page of one request's keys.

    Args:
        keys: ``[n_tokens, Hkv, D]`` post-RoPE keys, token ``i`` at position ``i``.
        page_size: ``P``.
    Returns:
        ``[n_tokens // P, Hkv, 2, D]``, same dtype; ``[..., 0, :]`` is the max, ``[..., 1, :]`` the min.
        A trailing partial page gets no digest.
    """
    n_full = keys.shape[0] // page_size
    pages = keys[: n_full * page_size].unflatten(0, (n_full, page_size))  # [n_full, P, Hkv, D]
    return torch.stack([pages.amax(dim=1), pages.amin(dim=1)], dim=2)


def append_page_digest(digests: torch.Tensor, keys: torch.Tensor, page_size: int) -> torch.Tensor:
    """Digests after one more page of ``keys`` (``[n_tokens, Hkv, D]``) became full.

    ``digests`` holds the digests of the first ``len(digests)`` pages. Returns them with the
    digests of every page that is full in ``keys`` but not yet digested appended.
    """
    n_full = keys.shape[0] // page_size
    have = digests.shape[0]
    if n_full <= have:
        return digests
    new = page_digests(keys[have * page_size : n_full * page_size], page_size)
    return torch.cat([digests, new], dim=0)
