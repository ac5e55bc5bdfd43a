"""Page scores: the Quest bound of every candidate page, aggregated over each GQA group.

For request ``b`` (row ``r = req_pool_idx[b]`` of ``req_to_token``), KV head ``h`` and
logical page ``p``::

    hp        = req_to_token[r, p * P] // P                       (host page of p)
    s[g, p]   = sum_d max(q[b, h*G+g, d] * mx[hp, h, d], q[b, h*G+g, d] * mn[hp, h, d])
    out[b, h, p] = mean_g s[g, p]   or   max_g s[g, p]             (candidates only)

Candidates are the full pages ``[n_sink, max(n_sink, ceil(n_ctx/P) - n_window))``, exactly
``WorkingSetLayout.candidate_mask``; every other entry of ``out`` gets ``-inf``, as does the
whole row of a KV head whose ``head_mask`` entry is False (correction scores only flagged
heads). ``softmax-mean`` has the kernel write the per-query-head bounds into a
``[B, Hq, max_pages]`` buffer, then :func:`algorithm.scores.aggregate_gqa` runs in torch.

The kernel uses ``max(q*mx, q*mn) = max(q,0)*mx + min(q,0)*mn`` (valid because
``mx >= mn``; with bf16/fp16 inputs every product is exact in fp32), so that the group's
scores are two small tensor-core matmuls ``[G, D] x [D, pages]`` with fp32 accumulation.
The kernel is bound by reading the digests (``4 * D`` bytes per page and KV head in bf16).
"""

from __future__ import annotations

import torch

from freekv_sglang.algorithm.scores import AGGREGATIONS, aggregate_gqa, quest_scores

from .common import (check_head_dim, check_kv_dtype, check_page_size, cdiv, interpreter_forced, next_pow2, sm_count, tl,
                     triton, use_triton)

_AGG_CODE = {"mean": 0, "max": 1, "softmax-mean": 2}

if triton is not None:

    @triton.jit
    def _group_bounds(q_row, stride_qh, dig_ptr, hp, h, cand, HKV: tl.constexpr, G: tl.constexpr,
                      BLOCK_G: tl.constexpr, D: tl.constexpr, F32_DOT: tl.constexpr, DSP: tl.constexpr,
                      DSH: tl.constexpr):
        """Quest bounds ``[BLOCK_G, BLOCK_N]`` fp32 of the ``G`` query heads at ``q_row`` (head
        stride ``stride_qh``) against KV head ``h`` of host pages ``hp [BLOCK_N]`` (``cand``: real).
        Digest ``(page, head)`` starts ``hp * DSP + h * DSH`` elements in (its ``[2, D]`` contiguous);
        the contiguous ``[pages, HKV, 2, D]`` layout has ``DSP = HKV * 2 * D``, ``DSH = 2 * D``."""
        d = tl.arange(0, D)
        g = tl.arange(0, BLOCK_G)
        qv = tl.load(q_row + g[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None], other=0.0)
        zero = tl.zeros_like(qv)
        qp = tl.maximum(qv, zero).to(dig_ptr.dtype.element_ty)  # exact: q has the digest dtype
        qn = tl.minimum(qv, zero).to(dig_ptr.dtype.element_ty)
        dig = dig_ptr + (hp * DSP + h.to(tl.int64) * DSH)[:, None] + d[None, :]
        mx = tl.load(dig, mask=cand[:, None], other=0.0)
        mn = tl.load(dig + D, mask=cand[:, None], other=0.0)
        if F32_DOT:  # Triton's CPU interpreter gets bf16 dots wrong; exact in fp32 too
            s = tl.dot(qp.to(tl.float32), tl.trans(mx.to(tl.float32)), input_precision="ieee")
            s = tl.dot(qn.to(tl.float32), tl.trans(mn.to(tl.float32)), s, input_precision="ieee")
        else:
            s = tl.dot(qp, tl.trans(mx))
            s = tl.dot(qn, tl.trans(mn), s)
        return s

    @triton.jit
    def _score_pages_kernel(
        q_ptr, dig_ptr, r2t_ptr, rpi_ptr, nctx_ptr, hmask_ptr, out_ptr,
        stride_qb, stride_qh, stride_r2t, stride_ob, stride_oh,
        max_pages, n_sink, n_window,
        HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_N: tl.constexpr, AGG: tl.constexpr, HAS_MASK: tl.constexpr, F32_DOT: tl.constexpr,
        HEADS_FAST: tl.constexpr, DSP: tl.constexpr, DSH: tl.constexpr,
    ):
        # One program: BLOCK_N pages x one KV head. Grid (cdiv(max_pages, BLOCK_N), B * Hkv), or with
        # HEADS_FAST (B * Hkv, cdiv(max_pages, BLOCK_N)): the KV heads of one block of pages side by side.
        if HEADS_FAST:
            pid_n = tl.program_id(1)
            bh = tl.program_id(0)
        else:
            pid_n = tl.program_id(0)
            bh = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = p < max_pages
        n = tl.load(nctx_ptr + b).to(tl.int64)
        n_pages = (n + PAGE - 1) // PAGE
        ws = tl.maximum(n_pages - n_window, n_sink)
        cand = in_range & (p >= n_sink) & (p < ws)
        if HAS_MASK:
            act = tl.load(hmask_ptr + b * HKV + h)
            cand = cand & (act != 0)
        r = tl.load(rpi_ptr + b).to(tl.int64)
        tok = tl.load(r2t_ptr + r * stride_r2t + p.to(tl.int64) * PAGE, mask=cand, other=0).to(tl.int64)
        hp = tok // PAGE
        g = tl.arange(0, BLOCK_G)
        gmask = g < G
        s = _group_bounds(q_ptr + b * stride_qb + h * G * stride_qh, stride_qh, dig_ptr, hp, h, cand,
                          HKV, G, BLOCK_G, D, F32_DOT, DSP, DSH)
        neg_inf = float("-inf")
        if AGG == 2:
            o = out_ptr + b * stride_ob + (h * G + g)[:, None] * stride_oh + p[None, :]
            tl.store(o, tl.where(cand[None, :], s, neg_inf), mask=gmask[:, None] & in_range[None, :])
        else:
            if AGG == 0:
                agg = tl.sum(tl.where(gmask[:, None], s, 0.0), axis=0) / G
            else:
                agg = tl.max(tl.where(gmask[:, None], s, neg_inf), axis=0)
            o = out_ptr + b * stride_ob + h * stride_oh + p
            tl.store(o, tl.where(cand, agg, neg_inf), mask=in_range)


def _candidates(n_ctx: torch.Tensor, max_pages: int, page_size: int, n_sink: int, n_window: int) -> torch.Tensor:
    """Bool ``[B, max_pages]``, equal to ``WorkingSetLayout.candidate_mask(n_ctx, max_pages)``.

    Written with ``clamp`` (Python scalars as kernel arguments) because the layout's
    ``_maximum`` builds a device scalar with ``torch.as_tensor``: a blocking H2D copy that
    breaks CUDA-graph capture.
    """
    n = n_ctx.long()
    ws = torch.clamp((n + page_size - 1) // page_size - n_window, min=n_sink)
    p = torch.arange(max_pages, device=n.device)
    return (p >= n_sink) & (p < ws[..., None])


def _score_dst(aggregation: str, head_scores: torch.Tensor | None, out: torch.Tensor, b: int, hq: int,
               max_pages: int) -> tuple[int, torch.Tensor | None, torch.Tensor]:
    """``(agg code, head_scores, dst)`` of a page-scoring launch: with ``softmax-mean`` the kernel writes
    the per-head scores to ``head_scores`` (allocated when ``None``, checked otherwise), else ``out``."""
    agg = _AGG_CODE[aggregation]
    if agg == 2:
        if head_scores is None:
            head_scores = torch.empty((b, hq, max_pages), dtype=torch.float32, device=out.device)
        elif head_scores.shape != (b, hq, max_pages) or head_scores.dtype != torch.float32 \
                or not head_scores.is_contiguous():
            raise ValueError(f"head_scores must be contiguous float32 {(b, hq, max_pages)}")
        return agg, head_scores, head_scores
    return agg, head_scores, out


def _finish_softmax_mean(head_scores: torch.Tensor, out: torch.Tensor, n_ctx: torch.Tensor,
                         head_mask: torch.Tensor | None, *, page_size: int, n_sink: int, n_window: int,
                         head_dim: int) -> None:
    """Writes the ``softmax-mean`` aggregation of the per-head ``head_scores`` to ``out`` (``-inf`` for
    non-candidates and masked heads)."""
    hkv, max_pages = out.shape[1], out.shape[2]
    valid = _candidates(n_ctx, max_pages, page_size, n_sink, n_window)
    res = aggregate_gqa(head_scores, hkv, "softmax-mean", valid, head_dim=head_dim)
    if head_mask is not None:
        res = res.masked_fill(~head_mask[:, :, None], float("-inf"))
    out.copy_(res)


def _candidate_host_pages(req_to_token, req_pool_idx, n_ctx, max_pages: int, page_size: int, n_sink: int,
                          n_window: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid, hp)`` of the scoring references: the candidate mask ``[B, max_pages]`` and each logical page's
    host page ``[B, max_pages]`` (0 where not a candidate)."""
    valid = _candidates(n_ctx, max_pages, page_size, n_sink, n_window)  # [B, Np]
    pos = torch.arange(max_pages, device=device) * page_size
    tok = req_to_token[req_pool_idx.long()][:, pos].long()  # [B, Np]
    hp = torch.where(valid, tok // page_size, torch.zeros_like(tok))
    return valid, hp


def _aggregate_reference(s: torch.Tensor, hkv: int, aggregation: str, valid: torch.Tensor, head_dim: int,
                         head_mask: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """The scoring references' last step: the per-head scores ``s`` ``[B, Hq, Np]`` aggregated over each KV
    head's query heads into ``out`` (``-inf`` for masked heads); returns ``out``."""
    agg = aggregate_gqa(s, hkv, aggregation, valid, head_dim=head_dim)
    if head_mask is not None:
        agg = agg.masked_fill(~head_mask.bool()[:, :, None], float("-inf"))
    out.copy_(agg)
    return out


def score_pages_reference(q, digests, req_to_token, req_pool_idx, n_ctx, head_mask, out, *, page_size, n_sink,
                          n_window, aggregation):
    """Plain-torch :func:`score_pages` (any device): ``quest_scores`` + ``aggregate_gqa``."""
    valid, hp = _candidate_host_pages(req_to_token, req_pool_idx, n_ctx, out.shape[2], page_size, n_sink, n_window,
                                      q.device)
    s = quest_scores(q, digests[hp])  # [B, Hq, Np]
    return _aggregate_reference(s, digests.shape[1], aggregation, valid, q.shape[2], head_mask, out)


def score_pages(q: torch.Tensor, digests: torch.Tensor, req_to_token: torch.Tensor, req_pool_idx: torch.Tensor,
                n_ctx: torch.Tensor, head_mask: torch.Tensor | None, out: torch.Tensor, *, page_size: int,
                n_sink: int, n_window: int, aggregation: str, head_scores: torch.Tensor | None = None,
                block_n: int | None = None, heads_fast: bool = False, impl: str | None = None) -> torch.Tensor:
    """GQA-aggregated Quest scores of every candidate page of each request.

    Args:
        q: ``[B, Hq, D]`` post-RoPE queries, dtype of the digests (rows/heads may be strided).
        digests: ``[n_host_pages, Hkv, 2, D]`` bf16/fp16, indexed by host page (``[..., 0, :]`` max,
            ``[..., 1, :]`` min, max >= min); each ``[2, D]`` contiguous, any page and head strides
            (e.g. a head-major ``[Hkv, n_host_pages, 2, D]`` buffer seen through ``.transpose(0, 1)``).
        req_to_token: int32 ``[R+1, max_ctx]`` token slot of each position of each row.
        req_pool_idx: int ``[B]`` row of each request (padded entries: any valid row, e.g. 0).
        n_ctx: int ``[B]`` context length (tokens) whose candidates are scored.
        head_mask: bool ``[B, Hkv]`` heads to score, or ``None`` for all; other rows get -inf.
        out: float32 ``[B, Hkv, max_pages]`` (``max_pages * P <= max_ctx``), fully written.
        page_size, n_sink, n_window: the working-set layout (``P``, pages).
        aggregation: ``"mean"``, ``"max"`` or ``"softmax-mean"``.
        head_scores: optional float32 ``[B, Hq, max_pages]`` scratch for ``softmax-mean``
            (allocated when ``None``; pass one for CUDA graphs to reuse it).
        block_n: pages per program (16/32/64); default: the largest that still gives at
            least two programs per SM (small problems are latency-bound).
        heads_fast: launch order: the KV heads of one block of pages as neighbouring programs
            (they read neighbouring digest bytes) rather than the blocks of one head (tuning only).
    Returns ``out``. No host synchronisation (graph-capturable).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown GQA aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if not use_triton(impl, q, digests, out):
        return score_pages_reference(q, digests, req_to_token, req_pool_idx, n_ctx, head_mask, out,
                                     page_size=page_size, n_sink=n_sink, n_window=n_window,
                                     aggregation=aggregation)
    b, hq, d = q.shape
    _, hkv, two, d2 = digests.shape
    max_pages = out.shape[2]
    if two != 2 or d2 != d or hq % hkv or out.shape[:2] != (b, hkv) or out.dtype != torch.float32:
        raise ValueError(f"shape/dtype mismatch: q {tuple(q.shape)}, digests {tuple(digests.shape)}, "
                         f"out {tuple(out.shape)} {out.dtype}")
    if max_pages * page_size > req_to_token.shape[1]:
        raise ValueError(f"out has {max_pages} pages but req_to_token rows hold only {req_to_token.shape[1]} tokens")
    if head_mask is not None and head_mask.shape != (b, hkv):
        raise ValueError(f"head_mask must be [B, Hkv] = {(b, hkv)}, got {tuple(head_mask.shape)}")
    check_head_dim(d)
    check_page_size(page_size)
    check_kv_dtype(digests.dtype)
    if q.dtype != digests.dtype:
        raise NotImplementedError(f"q dtype {q.dtype} must equal the digest dtype {digests.dtype}")
    if digests.stride(3) != 1 or digests.stride(2) != d or not out.is_contiguous() or req_to_token.stride(1) != 1:
        raise ValueError("each digest [2, D] must be contiguous, out contiguous, req_to_token rows contiguous")
    if q.stride(2) != 1:
        q = q.contiguous()
    g = hq // hkv
    agg, head_scores, dst = _score_dst(aggregation, head_scores, out, b, hq, max_pages)
    if b == 0 or max_pages == 0:
        return out
    hmask = head_mask.contiguous().view(torch.uint8) if head_mask is not None else out  # dummy pointer when absent
    if head_mask is not None and head_mask.dtype != torch.bool:
        raise ValueError("head_mask must be bool")
    if block_n is None:
        block_n = 64
        while block_n > 16 and cdiv(max_pages, block_n) * b * hkv < 2 * sm_count(out.device):
            block_n //= 2
    block_n = max(16, min(block_n, next_pow2(max_pages)))
    grid = (b * hkv, cdiv(max_pages, block_n)) if heads_fast else (cdiv(max_pages, block_n), b * hkv)
    _score_pages_kernel[grid](
        q, digests, req_to_token, req_pool_idx, n_ctx, hmask, dst,
        q.stride(0), q.stride(1), req_to_token.stride(0), dst.stride(0), dst.stride(1),
        max_pages, n_sink, n_window,
        HKV=hkv, G=g, BLOCK_G=max(16, next_pow2(g)), D=d, PAGE=page_size, BLOCK_N=block_n, AGG=agg,
        HAS_MASK=head_mask is not None, F32_DOT=interpreter_forced() and q.dtype == torch.bfloat16,
        HEADS_FAST=bool(heads_fast), DSP=digests.stride(0), DSH=digests.stride(1), num_warps=4,
    )
    if agg == 2:
        _finish_softmax_mean(head_scores, out, n_ctx, head_mask, page_size=page_size, n_sink=n_sink,
                             n_window=n_window, head_dim=d)
    return out
