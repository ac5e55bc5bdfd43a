"""Grid codes: every key of a page in 2 bits per channel, and the page score they give (the ``grid2`` rule).

The grid is per KV head and channel: ``lo[d]`` and ``step[d]`` (float32), four levels
``lo + (c + 0.5) * step`` for codes ``c = 0..3``. A key value ``k`` gets the number of thresholds it
reaches::

    t1 = lo + step,  t2 = lo + 2 * step,  t3 = t2 + step        (float32, in this order)
    code = [k >= t1] + [k >= t2] + [k >= t3]

that is ``floor((k - lo) / step)`` clamped to ``[0, 3]``, written with comparisons so that a kernel
gets the same codes bit for bit (each threshold is one rounded float32 operation, whatever the
compiler contracts) and a zero step gives no NaN. ``grid_from_bounds(lo, hi)`` gives the grid of
:class:`~.scoring_rules.GridCodes` (``step = (hi - lo) / 4``), whose codes these equal except for a
value within a rounding of a threshold.

Packed layout (the kernels' layout, chosen for the scoring kernel's loads): a token's ``D`` codes
take ``D / 4`` bytes; byte ``j`` holds channels ``j``, ``j + D/4``, ``j + D/2``, ``j + 3D/4`` in bits
0-1, 2-3, 4-5, 6-7. One shift and mask of a ``[tokens, D/4]`` byte tile then gives the codes of a
contiguous quarter of the channels, so the score is four matmuls of ``K = D/4`` with no interleaving
in registers. Pages are stored ``[pages, Hkv, P, D/4]`` uint8.

Page score, per query head (``q`` post-RoPE, ``[D]``) and page of ``P`` tokens::

    score = logsumexp_t  q . k_hat_t / sqrt(D),     k_hat_t[d] = lo[d] + (code_td + 0.5) * step[d]

the log of the page's attention mass under the quantized keys. As
``q . k_hat_t = q . lo + sum_d (q_d step_d) (code_td + 0.5)``, a kernel computes the per-token
logits as one matmul of the codes with ``q * step`` plus a per-(request, head) constant.
The GQA aggregation (``mean``/``max``/``softmax-mean``) and the top-k are Quest's.
"""

from __future__ import annotations

import math

import torch

BITS = 2
LEVELS = 1 << BITS
#: channels per packed byte
PER_BYTE = 8 // BITS


def grid_from_bounds(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, step)`` float32 of the grid of ``LEVELS`` equal steps between ``lo`` and ``hi``."""
    lo = lo.float()
    return lo, (hi.float() - lo) / LEVELS


def grid_thresholds(lo: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three code thresholds of a grid (float32; see module docstring for the exact operations)."""
    lo, step = lo.float(), step.float()
    t2 = lo + 2.0 * step  # 2 * step is exact: one rounding, also when fused into an FMA
    return lo + step, t2, t2 + step


def quantize_keys(keys: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Codes (uint8 ``0..3``, unpacked) of ``keys [..., D]`` on the grid ``lo``/``step`` (broadcast against
    ``keys``, e.g. ``[Hkv, D]`` for keys ``[n, Hkv, D]``)."""
    k = keys.float()
    t1, t2, t3 = grid_thresholds(lo, step)
    return ((k >= t1).to(torch.uint8) + (k >= t2).to(torch.uint8) + (k >= t3).to(torch.uint8))


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` codes ``0..3`` -> ``[..., D / 4]`` uint8, byte ``j`` = channels ``j + i D/4`` at bits ``2 i``."""
    d = codes.shape[-1]
    if d % PER_BYTE:
        raise ValueError(f"head dim {d} is not a multiple of {PER_BYTE}")
    q = codes.to(torch.uint8).unflatten(-1, (PER_BYTE, d // PER_BYTE))  # [..., 4, D/4]
    out = torch.zeros(q.shape[:-2] + (d // PER_BYTE,), dtype=torch.uint8, device=codes.device)
    for i in range(PER_BYTE):
        out |= (q[..., i, :] & (LEVELS - 1)) << (BITS * i)
    return out


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., D / 4]`` uint8 -> ``[..., D]`` uint8 codes."""
    parts = [(packed >> (BITS * i)) & (LEVELS - 1) for i in range(PER_BYTE)]
    return torch.cat(parts, dim=-1)


def dequantize(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Level values ``lo + (codes + 0.5) * step`` (float32) of unpacked codes."""
    return lo.float() + (codes.float() + 0.5) * step.float()


def page_grid_codes(keys: torch.Tensor, page_size: int, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Packed codes of every *full* page of one request's keys.

    Args:
        keys: ``[n_tokens, Hkv, D]`` post-RoPE keys, token ``i`` at position ``i``.
        page_size: ``P``.
        lo, step: ``[Hkv, D]`` float32 grid.
    Returns:
        uint8 ``[n_tokens // P, Hkv, P, D / 4]`` (a trailing partial page gets none).
    """
    n_full = keys.shape[0] // page_size
    codes = quantize_keys(keys[: n_full * page_size], lo, step)  # [n, Hkv, D]
    return pack_codes(codes).unflatten(0, (n_full, page_size)).permute(0, 2, 1, 3).contiguous()


def grid_scores(q: torch.Tensor, packed: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Per-query-head page scores ``logsumexp_t q . k_hat_t / sqrt(D)``.

    Args:
        q: ``[B, Hq, D]`` queries.
        packed: ``[B, Np, Hkv, P, D / 4]`` packed codes of each request's pages.
        lo, step: ``[B, Hkv, D]`` (or ``[1, Hkv, D]``, or ``[Hkv, D]``) float32 grid of each request.
    Returns:
        float32 ``[B, Hq, Np]``.
    """
    b, hq, d = q.shape
    hkv = packed.shape[2]
    lo = lo.float().expand(b, hkv, d)
    step = step.float().expand(b, hkv, d)
    k_hat = dequantize(unpack_codes(packed), lo[:, None, :, None], step[:, None, :, None])  # [B, Np, Hkv, P, D]
    logits = torch.einsum("bkgd,bpktd->bkgpt", q.float().view(b, hkv, hq // hkv, d), k_hat) / math.sqrt(d)
    return torch.logsumexp(logits, -1).reshape(b, hq, -1)


#: quantiles of the sink's keys that bound the grid (:meth:`~.scoring_rules.GridCodes.grid`, ``minmax=False``)
GRID_QUANTILES = (0.005, 0.995)
#: elements per torch.quantile call (it refuses larger inputs)
_QUANTILE_MAX = 1 << 24


def fit_grids(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, step)`` float32 ``[B, Hkv, D]`` of the ``grid2sink`` rule for ``B`` token sets ``keys [B, n, Hkv, D]``
    (each request's sink keys): per channel the 0.5% and 99.5% quantiles over the ``n`` tokens, as
    :meth:`~.scoring_rules.GridCodes.grid` computes them, then :func:`grid_from_bounds`. Requests are fitted in
    chunks that torch.quantile accepts; each request's grid does not depend on the others'."""
    k = keys.float()
    per = max(1, _QUANTILE_MAX // max(1, k[:1].numel()))
    los, his = [], []
    for i in range(0, k.shape[0], per):
        c = k[i:i + per]
        los.append(torch.quantile(c, GRID_QUANTILES[0], dim=1))
        his.append(torch.quantile(c, GRID_QUANTILES[1], dim=1))
    if not los:
        z = k.new_zeros((0, *k.shape[2:]))
        return z, z.clone()
    return grid_from_bounds(torch.cat(los), torch.cat(his))
