"""Scoring, top-k and the residency update of one selection, in two launches.

Same result as :func:`.scores.score_pages` followed by :func:`.select.select_update`, without
the ``[B, Hkv, max_pages]`` score tensor and without ``torch.topk`` (whose sort kernels cost
more than the scoring itself at 4096 pages):

1. ``_score_block_topk_kernel``, grid ``(cdiv(n_blocks, SUB), B * Hkv)``: each program scores
   ``SUB`` blocks of ``BLOCK_N`` pages of one (request, KV head) exactly as ``score_pages`` does
   (in a software-pipelined loop when ``SUB > 1``) and keeps each block's top ``KB`` pages as
   packed int64 *keys* (see :func:`pack_keys_reference`). Blocks past the request's candidates
   and heads outside ``head_mask`` read nothing.
2. ``_merge_select_kernel``, grid ``(B * Hkv,)``: the top ``k`` of the live blocks' keys (the
   global top-k is inside the union of the per-block top-k), read in chunks of at most 1024 keys
   up to the request's last live block, and the residency update of :mod:`.select`, in the same
   program.

With ``fill_resident = m > 0`` (the corrected selection under speculative over-fetch,
:func:`freekv_sglang.algorithm.selection.overfetch_select`) the scoring programs also store the key of
every resident page of their block, by resident slot; the merge takes the top ``k - m`` keys and fills
the other ``m`` slots with the best resident keys outside them, so only pages of the top ``k - m`` are
recalled.

Keys order pages by score, then by lower page index on equal scores; a key of
``INT64_MIN`` marks "no page" (not a candidate, or a non-finite score). Only ``mean`` and
``max`` GQA aggregation are fused; ``softmax-mean`` needs whole rows and goes through
``score_pages`` + ``select_update``.

With ``grid=(lo, step)`` the pages are scored from 2-bit grid codes (the ``grid2`` rule,
:mod:`.grid_codes`) instead of Quest digests; the rest is the same.
"""

from __future__ import annotations

import math

import torch

from freekv_sglang.algorithm.selection import sticky_scores

from .common import (cdiv, check_head_dim, check_kv_dtype, check_page_size, interpreter_forced, next_pow2, sm_count, tl,
                     triton, use_triton)
from .grid_codes import (LOG2E, check_grid_codes_args, check_grid_head_dim, check_grid_page_size, grid_block_g,
                         grid_block_pages,
                         score_pages_grid, score_pages_grid_reference)
from .scores import score_pages, score_pages_reference
from .select import _residency_row, select_update, select_update_reference

if triton is not None:
    from .grid_codes import _grid_block_scores
    from .scores import _group_bounds

NO_KEY = -(2**63)
_LOW = 2**32 - 1

if triton is not None:

    @triton.jit
    def _block_keys(q_row, stride_qh, dig_ptr, r2t_row, keys_ptr, pid_n, live, ws, n_sink, h, lo_row, st_row,
                    qk_scale, HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr, NB: tl.constexpr, AGG: tl.constexpr,
                    F32_DOT: tl.constexpr, DSP: tl.constexpr, DSH: tl.constexpr, GRID: tl.constexpr,
                    BLOCK_PG: tl.constexpr, res_row, rkeys_row, FILL: tl.constexpr, KR: tl.constexpr,
                    KRES: tl.constexpr, GRID_BG: tl.constexpr, I8: tl.constexpr):
        """Score block ``pid_n`` (``BLOCK_N`` pages) of one (request, KV head); store its top ``KB`` keys
        (every key ``NO_KEY`` when not ``live``; nothing past block ``NB``). ``DSP``/``DSH``: digest
        strides as :func:`.scores._group_bounds`. With ``GRID``, ``dig_ptr`` holds grid codes (``DSP``/``DSH``
        their page/head strides) scored on the grid at ``lo_row``/``st_row`` (:mod:`.grid_codes`; ``GRID_BG``,
        ``I8``: its query-head columns and int8 products). With
        ``FILL``, also the key of each resident page (``res_row [KRES]``) in this block, at its slot of
        ``rkeys_row [KR]``."""
        p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cand = (p >= n_sink) & (p < ws) & live
        if GRID:
            agg = _grid_block_scores(q_row, stride_qh, dig_ptr, r2t_row, lo_row, st_row, qk_scale, pid_n * BLOCK_N,
                                     ws, n_sink, live, h, DSP, DSH, G, GRID_BG, D // 4, PAGE, BLOCK_N, BLOCK_PG, AGG,
                                     F32_DOT, I8)
        else:
            tok = tl.load(r2t_row + p.to(tl.int64) * PAGE, mask=cand, other=0).to(tl.int64)
            hp = tok // PAGE
            gmask = tl.arange(0, BLOCK_G) < G
            s = _group_bounds(q_row, stride_qh, dig_ptr, hp, h, cand, HKV, G, BLOCK_G, D, F32_DOT, DSP, DSH)
            if AGG == 0:
                agg = tl.sum(tl.where(gmask[:, None], s, 0.0), axis=0) / G
            else:
                agg = tl.max(tl.where(gmask[:, None], s, float("-inf")), axis=0)
        ok = cand & (agg == agg) & (agg != float("inf")) & (agg != float("-inf"))
        bits = agg.to(tl.int32, bitcast=True)
        mono = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        key = (mono << 32) | (4294967295 - p.to(tl.int64))
        key = tl.where(ok, key, -9223372036854775807 - 1)
        if FILL:  # the resident pages' keys, by slot (each resident page lies in one block)
            r = tl.arange(0, KR)
            off = tl.load(res_row + r, mask=r < KRES, other=-1).to(tl.int64) - pid_n * BLOCK_N
            here = (r < KRES) & (off >= 0) & (off < BLOCK_N) & (pid_n < NB)
            tl.store(rkeys_row + r, tl.gather(key, tl.where(here, off, 0).to(tl.int32), 0), mask=here)
        top = tl.topk(key, KB)
        kk = tl.arange(0, KB)
        tl.store(keys_ptr + pid_n * KB + kk, top, mask=(kk < KB) & (pid_n < NB))

    @triton.jit
    def _score_block_topk_kernel(
        q_ptr, qidx_ptr, dig_ptr, r2t_ptr, rows_ptr, nctx_ptr, hmask_ptr, keys_ptr, lo_ptr, st_ptr, gidx_ptr,
        res_ptr, rkeys_ptr, stride_qb, stride_qh, stride_r2t, n_sink, n_window, stride_lg, stride_lh, stride_tg,
        stride_th, qk_scale,
        HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_N: tl.constexpr, KB: tl.constexpr, NB: tl.constexpr, AGG: tl.constexpr, HAS_MASK: tl.constexpr,
        Q_BY_ROW: tl.constexpr, F32_DOT: tl.constexpr, HEADS_FAST: tl.constexpr, SUB: tl.constexpr,
        STAGES: tl.constexpr, DSP: tl.constexpr, DSH: tl.constexpr, GRID: tl.constexpr, BLOCK_PG: tl.constexpr,
        HAS_GIDX: tl.constexpr, FILL: tl.constexpr, KR: tl.constexpr, KRES: tl.constexpr,
        GRID_BG: tl.constexpr, I8: tl.constexpr,
    ):
        # One program: SUB consecutive blocks of BLOCK_N pages of one (request, KV head), the blocks in a
        # software-pipelined loop when SUB > 1. Grid (cdiv(NB, SUB), B * Hkv), or with HEADS_FAST
        # (B * Hkv, cdiv(NB, SUB)): the heads of one block of pages side by side.
        if HEADS_FAST:
            pid_p = tl.program_id(1)
            bh = tl.program_id(0).to(tl.int64)
        else:
            pid_p = tl.program_id(0)
            bh = tl.program_id(1).to(tl.int64)
        b = bh // HKV
        h = bh % HKV
        n = tl.load(nctx_ptr + b).to(tl.int64)
        n_pages = (n + PAGE - 1) // PAGE
        ws = tl.maximum(n_pages - n_window, n_sink)
        act = True
        if HAS_MASK:
            act = tl.load(hmask_ptr + bh) != 0
        if Q_BY_ROW:
            qb = tl.load(qidx_ptr + b).to(tl.int64)
        else:
            qb = b
        q_row = q_ptr + qb * stride_qb + h * G * stride_qh
        row = tl.load(rows_ptr + b).to(tl.int64)
        r2t_row = r2t_ptr + row * stride_r2t
        keys_row = keys_ptr + bh * NB * KB
        res_row = res_ptr + (row * HKV + h) * KRES  # FILL only: the resident pages and their keys
        rkeys_row = rkeys_ptr + bh * KR
        if HAS_GIDX:  # grid codes: the request's grid row (else row b, or row 0 through a zero stride)
            gi = tl.load(gidx_ptr + b).to(tl.int64)
        else:
            gi = b
        lo_row = lo_ptr + gi * stride_lg + h * stride_lh
        st_row = st_ptr + gi * stride_tg + h * stride_th
        if SUB == 1:
            live = act & (pid_p * BLOCK_N < ws)
            if live:  # blocks past the candidates are never read by the merge: no store
                _block_keys(q_row, stride_qh, dig_ptr, r2t_row, keys_row, pid_p, live, ws, n_sink, h, lo_row, st_row,
                            qk_scale, HKV, G, BLOCK_G, D, PAGE, BLOCK_N, KB, NB, AGG, F32_DOT, DSP, DSH, GRID,
                            BLOCK_PG, res_row, rkeys_row, FILL, KR, KRES, GRID_BG, I8)
        elif act & (pid_p * SUB * BLOCK_N < ws):  # a span wholly past the candidates (or a head the mask
            # leaves alone) does nothing: the merge reads only live blocks' keys
            for j in tl.range(0, SUB, num_stages=STAGES):
                pid_n = pid_p * SUB + j
                _block_keys(q_row, stride_qh, dig_ptr, r2t_row, keys_row, pid_n, pid_n * BLOCK_N < ws, ws,
                            n_sink, h, lo_row, st_row, qk_scale, HKV, G, BLOCK_G, D, PAGE, BLOCK_N, KB, NB, AGG,
                            F32_DOT, DSP, DSH, GRID, BLOCK_PG, res_row, rkeys_row, FILL, KR, KRES, GRID_BG, I8)

    @triton.jit
    def _merge_select_kernel(
        keys_ptr, nctx_ptr, res_ptr, rows_ptr, hmask_ptr, rslot_ptr, rpage_ptr, cnt_ptr, rkeys_ptr,
        n_sink, n_window,
        HKV: tl.constexpr, K: tl.constexpr, KB: tl.constexpr, NB: tl.constexpr, CB: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HAS_MASK: tl.constexpr, COUNT: tl.constexpr,
        MARGIN: tl.constexpr, KR: tl.constexpr, FILL: tl.constexpr,
    ):
        # The live blocks' keys in chunks of CB blocks: the first chunk's top KB, then each further chunk's
        # top KB merged in; a short context pays for its own blocks, not the server's longest.
        pid = tl.program_id(0).to(tl.int64)
        b = pid // HKV
        h = pid % HKV
        row = tl.load(rows_ptr + b).to(tl.int64)
        if HAS_MASK:
            act = tl.load(hmask_ptr + pid) != 0
        else:
            act = row >= 0
        i = tl.arange(0, KB)
        inb = i < K
        if act:
            n = tl.load(nctx_ptr + b).to(tl.int64)
            n_pages = (n + PAGE - 1) // PAGE
            ws = tl.maximum(n_pages - n_window, n_sink)
            n_live = tl.minimum((ws + BLOCK_N - 1) // BLOCK_N, NB)
            j = tl.arange(0, CB * KB)
            blk = j // KB
            row_keys = keys_ptr + pid * NB * KB
            top = tl.topk(tl.load(row_keys + j, mask=blk < n_live, other=-9223372036854775807 - 1), KB)
            for c in range(1, (NB + CB - 1) // CB):
                c0 = c * CB
                if c0 < n_live:
                    chunk = tl.topk(tl.load(row_keys + c0 * KB + j, mask=c0 + blk < n_live,
                                            other=-9223372036854775807 - 1), KB)
                    top = tl.topk(tl.reshape(tl.join(top, chunk), [2 * KB]), KB)
            # top: descending
            if FILL > 0:  # over-fetch correction: the top K - FILL, then the best resident pages outside them
                r = tl.arange(0, KR)  # KR == KB here
                rp = tl.load(res_ptr + (row * HKV + h) * K + r, mask=r < K, other=-1).to(tl.int64)
                scored = (r < K) & (rp >= n_sink) & (rp < tl.minimum(ws, NB * BLOCK_N))  # keys stored this call
                rk = tl.load(rkeys_ptr + pid * KR + r, mask=scored, other=-9223372036854775807 - 1)
                a = (i < K - FILL) & (top != -9223372036854775807 - 1)
                in_a = tl.max(((top[:, None] == rk[None, :]) & a[:, None]).to(tl.int32), axis=0) > 0
                rest = tl.where(scored & (in_a == 0), rk, -9223372036854775807 - 1)
                # every key outside the top K - FILL ranks below all of them: the top K of both sets is the union
                top = tl.topk(tl.reshape(tl.join(tl.where(a, top, -9223372036854775807 - 1), rest), [2 * KB]), KB)
            if MARGIN > 0:  # hysteresis: a resident page among the top K + MARGIN outranks every other page
                pg = 4294967295 - (top & 4294967295)
                r = tl.arange(0, KR)
                res = tl.load(res_ptr + (row * HKV + h) * K + r, mask=r < K, other=-1).to(tl.int64)
                hit = (pg[:, None] == res[None, :]) & (res[None, :] >= 0)
                kept = (tl.max(hit.to(tl.int32), axis=1) > 0) & (i < K + MARGIN) & (top != -9223372036854775807 - 1)
                # above every real key (scores' monotone bits stay below 0x7FFFFFFF); low bits keep the page order
                top = tl.topk(tl.where(kept, 9223372032559808512 | (top & 4294967295), top), KB)
            fin = inb & (top != -9223372036854775807 - 1)
            idx = tl.where(fin, 4294967295 - (top & 4294967295), -1)
            _residency_row(fin, idx, i, inb, act, res_ptr + (row * HKV + h) * K, rslot_ptr + pid * K,
                           rpage_ptr + pid * K, cnt_ptr, row, K, COUNT)
        else:  # head keeps its pages: nothing to recall
            tl.store(rslot_ptr + pid * K + i, tl.full([KB], -1, tl.int32), mask=inb)
            tl.store(rpage_ptr + pid * K + i, tl.full([KB], -1, tl.int32), mask=inb)


def pack_keys_reference(scores: torch.Tensor) -> torch.Tensor:
    """The kernels' int64 keys of float32 ``scores [..., Np]`` (plain torch, for tests):
    ``(monotone int32 of the score) << 32 | (2**32 - 1 - page)``; ``NO_KEY`` for non-finite."""
    bits = scores.contiguous().view(torch.int32).long()
    mono = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    page = torch.arange(scores.shape[-1], device=scores.device)
    key = (mono << 32) | (_LOW - page)
    return torch.where(torch.isfinite(scores), key, torch.full_like(key, NO_KEY))


def block_size(max_pages: int, k: int) -> int:
    """Pages per scoring program: at least 64 and ``2 * KB``, at most 32 blocks per row (cap 512)."""
    kb = max(16, next_pow2(k))
    return max(64, 2 * kb, min(512, next_pow2(cdiv(max_pages, 32))))


PIPELINED_SHAPE = dict(block_n=64, num_warps=2, blocks_per_program=2, num_stages=3)
#: Default scoring launch with grid codes: blocks of 64 pages (at least the per-block top-k), one per program,
#: 4 warps (a warpgroup: the grid's products run on wgmma), 2 stages. The best of the six shapes swept at
#: 32K x 8 on an H100 (docs/BENCHMARKS.md, "grid2 page scoring"): 55.9 us against 71.8 us for PIPELINED_SHAPE.
GRID_SHAPE = dict(block_n=64, num_warps=4, blocks_per_program=1, num_stages=2)


def launch_shape(batch: int, n_kv_heads: int, max_pages: int, k: int, sms: int) -> dict:
    """Default scoring launch of :func:`score_and_select` for ``k`` kept keys per block: two 64-page
    blocks per program in a 3-stage pipelined loop, 2 warps, when that still gives at least two programs
    per SM (the best of the shapes swept at batch 8, 32K and 128K contexts); otherwise (small,
    latency-bound problems) one :func:`block_size` block per program, 4 warps."""
    kb = max(16, next_pow2(k))
    sh = PIPELINED_SHAPE
    spans = cdiv(cdiv(max_pages, sh["block_n"]), sh["blocks_per_program"])
    if sh["block_n"] >= 2 * kb and batch * n_kv_heads * spans >= 2 * sms:
        return dict(sh)
    return dict(block_n=block_size(max_pages, k), num_warps=4, blocks_per_program=1, num_stages=2)


def selection_scratch_size(batch: int, n_kv_heads: int, max_pages: int, k: int, block_n: int | None = None,
                           margin: int = 0, fill_resident: int = 0) -> int:
    """int64 entries of the ``keys`` scratch :func:`score_and_select` needs for up to ``batch`` requests
    (with ``block_n`` pages per scoring program; default: enough for either shape of :func:`launch_shape`;
    ``margin`` and ``fill_resident`` as there: the latter adds one key per resident slot)."""
    if block_n is None:
        bn = min(block_size(max_pages, k + margin), PIPELINED_SHAPE["block_n"])
    else:
        bn = block_n
    blocks = batch * n_kv_heads * cdiv(max_pages, bn) * max(16, next_pow2(k + margin))
    return blocks + (batch * n_kv_heads * max(16, next_pow2(k)) if fill_resident else 0)


def score_and_select_reference(q, digests, req_to_token, rows, n_ctx, head_mask, resident, k, recall_slot,
                               recall_page, counter=None, *, max_pages, page_size, n_sink, n_window, aggregation,
                               q_index=None, margin=0, grid=None, grid_index=None, fill_resident=0):
    """Plain torch: :func:`.scores.score_pages_reference` (with ``grid``:
    :func:`.grid_codes.score_pages_grid_reference`), the hysteresis of
    :func:`freekv_sglang.algorithm.selection.sticky_scores` (``margin > 0``), then
    :func:`.select.select_update_reference` (``fill_resident``: the over-fetch correction there)."""
    if q_index is not None:
        q = q[q_index.long()]
    out = torch.empty((q.shape[0], digests.shape[1], max_pages), dtype=torch.float32, device=q.device)
    kw = dict(page_size=page_size, n_sink=n_sink, n_window=n_window, aggregation=aggregation)
    if grid is not None:
        score_pages_grid_reference(q, digests, grid[0], grid[1], req_to_token, rows, n_ctx, head_mask, out,
                                   grid_index=grid_index, **kw)
    else:
        score_pages_reference(q, digests, req_to_token, rows, n_ctx, head_mask, out, **kw)
    if margin:
        out = sticky_scores(out, resident[rows.long()], k, margin)
    select_update_reference(out, resident, rows, head_mask, k, recall_slot, recall_page, counter, fill_resident)


def score_and_select(q: torch.Tensor, digests: torch.Tensor, req_to_token: torch.Tensor, rows: torch.Tensor,
                     n_ctx: torch.Tensor, head_mask: torch.Tensor | None, resident: torch.Tensor, k: int,
                     recall_slot: torch.Tensor, recall_page: torch.Tensor, counter: torch.Tensor | None = None, *,
                     max_pages: int, page_size: int, n_sink: int, n_window: int, aggregation: str,
                     q_index: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                     impl: str | None = None, block_n: int | None = None, num_warps: int | None = None,
                     margin: int = 0, heads_fast: bool = False, blocks_per_program: int | None = None,
                     num_stages: int | None = None, merge_warps: int | None = None,
                     grid: tuple[torch.Tensor, torch.Tensor] | None = None,
                     grid_index: torch.Tensor | None = None, fill_resident: int = 0,
                     int8: bool = True) -> None:
    """Select the top-``k`` candidate pages per (request, KV head) and update residency, in place.

    Args:
        q: ``[B, Hq, D]`` queries (digest dtype); with ``q_index``, ``[Nq, Hq, D]`` read at
            ``q[q_index[b]]`` (e.g. the previous queries of every row, no gather needed).
        digests: ``[n_host_pages, Hkv, 2, D]``, each ``[2, D]`` contiguous (any page / head strides, as
            :func:`.scores.score_pages`); req_to_token: int32 ``[R+1, max_ctx]``.
        rows: int ``[B]`` request rows; n_ctx: int ``[B]`` context whose candidates are scored.
        head_mask: bool ``[B, Hkv]`` heads to reselect (others keep their pages), or ``None``.
        resident: int ``[R+1, Hkv, k]`` resident pages of the layer, updated in place.
        recall_slot, recall_page: int32 ``[B, Hkv, k]`` outputs as :func:`.select.select_update`.
        counter: optional int64 scalar view accumulating recalled pieces of real rows.
        max_pages: candidate pages considered (``max_pages * P <= max_ctx``).
        keys: optional int64 scratch ``[B * Hkv * n_blocks * KB]`` (allocated when ``None``).
        block_n, num_warps: pages per scoring block (a power of two, at least ``KB``) and the scoring
            program's warps; with both ``None``, :func:`launch_shape` (with ``grid``: :data:`GRID_SHAPE`)
            chooses them and the two below;
            with ``block_n`` alone ``None``, :func:`block_size` (tuning: the result does not depend on them).
        margin: residency hysteresis in pages: a resident page ranked within the top ``k + margin``
            stays selected (:func:`freekv_sglang.algorithm.selection.sticky_scores`); 0 = plain top-k.
            The blocks then keep their top ``k + margin`` keys.
        heads_fast: launch the scoring programs of one block of pages for all KV heads side by side
            (neighbouring digest bytes) instead of all blocks of one head (tuning only).
        blocks_per_program, num_stages: scoring blocks per program, read in a software-pipelined loop of
            ``num_stages`` stages when more than one (tuning only; default 1 and 2 unless
            :func:`launch_shape` chooses).
        merge_warps: warps of the merge program (default 4 up to 1024 keys per row, else 8).
        grid: ``(lo, step)`` to score with 2-bit grid codes (the ``grid2`` rule, :mod:`.grid_codes`) instead of
            Quest: ``digests`` is then the codes ``[n_host_pages, Hkv, P, D/4]`` uint8 and ``lo``/``step`` the
            float32 ``[n_grids, Hkv, D]`` grid as :func:`.grid_codes.score_pages_grid` takes it, rows picked
            by ``grid_index [B]`` (else row ``b``, or the one row). Each scoring block then runs ``BLOCK_N / BLOCK_PG``
            tensor-core steps (:func:`.grid_codes.grid_block_pages`).
        fill_resident: ``m > 0``: the corrected selection under speculative over-fetch
            (:func:`freekv_sglang.algorithm.selection.overfetch_select`): the top ``k - m`` pages by score, and the
            ``m`` best-scoring resident pages outside them in the other slots, so only pages of the top ``k - m``
            are recalled. Not with ``margin``.
        int8: with ``grid``, the scoring products in int8 (the default) or bf16 (:mod:`.grid_codes`).
    No host synchronisation; CUDA-graph capturable.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not 0 <= fill_resident < k or (fill_resident and margin):
        raise ValueError(f"fill_resident must be in [0, {k}) and not combined with a margin, got {fill_resident} "
                         f"(margin {margin})")
    if not use_triton(impl, q, digests, resident):
        return score_and_select_reference(q, digests, req_to_token, rows, n_ctx, head_mask, resident, k,
                                          recall_slot, recall_page, counter, max_pages=max_pages,
                                          page_size=page_size, n_sink=n_sink, n_window=n_window,
                                          aggregation=aggregation, q_index=q_index, margin=margin, grid=grid,
                                          grid_index=grid_index, fill_resident=fill_resident)
    b = rows.shape[0]
    if grid is not None:  # codes [pages, Hkv, P, D/4]: checked as score_pages_grid checks them
        hkv, d, two = digests.shape[1], q.shape[2], 2
        check_grid_codes_args(q, digests, grid[0], grid[1], grid_index, b, page_size)
    else:
        _, hkv, two, d = digests.shape
    hq = q.shape[1]
    if b == 0:
        return
    if aggregation == "softmax-mean":  # needs whole rows: unfused path
        qq = q[q_index.long()] if q_index is not None else q
        out = torch.empty((b, hkv, max_pages), dtype=torch.float32, device=q.device)
        if grid is not None:
            score_pages_grid(qq, digests, grid[0], grid[1], req_to_token, rows, n_ctx, head_mask, out,
                             page_size=page_size, n_sink=n_sink, n_window=n_window, aggregation=aggregation,
                             grid_index=grid_index, impl=impl)
        else:
            score_pages(qq, digests, req_to_token, rows, n_ctx, head_mask, out, page_size=page_size,
                        n_sink=n_sink, n_window=n_window, aggregation=aggregation, impl=impl)
        if margin:
            out = sticky_scores(out, resident[rows.long()], k, margin)  # torch ops: no host sync
        select_update(out, resident, rows, head_mask, k, recall_slot, recall_page, counter, impl=impl,
                      fill_resident=fill_resident)
        return
    if aggregation not in ("mean", "max"):
        raise ValueError(f"unknown GQA aggregation {aggregation!r}")
    if two != 2 or q.shape[2] != d or hq % hkv or (grid is None and q.dtype != digests.dtype):
        raise ValueError(f"shape/dtype mismatch: q {tuple(q.shape)} {q.dtype}, digests {tuple(digests.shape)} "
                         f"{digests.dtype}")
    if max_pages * page_size > req_to_token.shape[1]:
        raise ValueError(f"max_pages {max_pages} exceeds the {req_to_token.shape[1]} tokens of a req_to_token row")
    if resident.shape[1:] != (hkv, k) or recall_slot.shape != (b, hkv, k) or recall_page.shape != (b, hkv, k):
        raise ValueError(f"resident {tuple(resident.shape)} / recall lists {tuple(recall_slot.shape)} do not match "
                         f"(B={b}, Hkv={hkv}, k={k})")
    check_head_dim(d)
    check_page_size(page_size)
    check_kv_dtype(q.dtype if grid is not None else digests.dtype)
    if grid is not None:
        check_grid_head_dim(d)
        check_grid_page_size(page_size, q.device)
    inner = (d // 4, 1) if grid is not None else (d, 1)
    if (digests.stride(2), digests.stride(3)) != inner or not resident.is_contiguous() \
            or req_to_token.stride(1) != 1:
        raise ValueError("each digest [2, D] (grid codes: page-head [P, D/4]) must be contiguous, resident "
                         "contiguous, req_to_token rows contiguous")
    if q.stride(2) != 1:
        q = q.contiguous()
    kb = max(16, next_pow2(k + margin))
    if block_n is None and num_warps is None:
        shape = launch_shape(b, hkv, max_pages, k + margin, sm_count(q.device)) if grid is None else \
            dict(GRID_SHAPE, block_n=max(GRID_SHAPE["block_n"], kb))
    else:  # explicit tuning: one block per program unless asked otherwise
        shape = dict(block_n=block_size(max_pages, k + margin) if block_n is None else block_n,
                     num_warps=4 if num_warps is None else num_warps, blocks_per_program=1, num_stages=2)
    bn, num_warps = shape["block_n"], shape["num_warps"]
    blocks_per_program = shape["blocks_per_program"] if blocks_per_program is None else blocks_per_program
    num_stages = shape["num_stages"] if num_stages is None else num_stages
    if bn < kb or bn & (bn - 1):
        raise ValueError(f"block_n={bn} must be a power of two of at least {kb} (the per-block top-k)")
    if blocks_per_program < 1 or num_stages < 1 or merge_warps not in (None, 1, 2, 4, 8, 16):
        raise ValueError(f"blocks_per_program ({blocks_per_program}) and num_stages ({num_stages}) must be >= 1, "
                         f"merge_warps 1/2/4/8/16, got {merge_warps}")
    need = selection_scratch_size(b, hkv, max_pages, k, bn, margin, fill_resident)
    if keys is None:
        keys = torch.empty(need, dtype=torch.int64, device=q.device)
    elif keys.numel() < need or keys.dtype != torch.int64:
        raise ValueError(f"keys scratch must hold {need} int64, got {keys.numel()} {keys.dtype}")
    if head_mask is not None:
        if head_mask.shape != (b, hkv) or head_mask.dtype != torch.bool:
            raise ValueError(f"head_mask must be bool {(b, hkv)}")
        hm = head_mask.contiguous().view(torch.uint8)
    else:
        hm = keys
    qi = q_index if q_index is not None else rows
    # with fill_resident: one key per resident slot after the blocks' keys
    rkeys = keys[selection_scratch_size(b, hkv, max_pages, k, bn, margin):] if fill_resident else None
    score_block_topk(q, qi, digests, req_to_token, rows, n_ctx, hm, keys, hkv=hkv, block_n=bn, kb=kb,
                     page_size=page_size, n_sink=n_sink, n_window=n_window, aggregation=aggregation,
                     has_mask=head_mask is not None, q_by_row=q_index is not None, num_warps=num_warps,
                     heads_fast=heads_fast, max_pages=max_pages, blocks_per_program=blocks_per_program,
                     num_stages=num_stages, grid=grid, grid_index=grid_index, resident=resident, rkeys=rkeys,
                     int8=bool(int8))
    merge_select(keys, n_ctx, resident, rows, hm, recall_slot, recall_page, counter, hkv=hkv, k=k, kb=kb, block_n=bn,
                 page_size=page_size, n_sink=n_sink, n_window=n_window, has_mask=head_mask is not None,
                 margin=margin, max_pages=max_pages, num_warps=merge_warps, fill_resident=fill_resident, rkeys=rkeys)


def score_block_topk(q, q_index, digests, req_to_token, rows, n_ctx, head_mask_u8, keys, *, hkv, block_n, kb,
                     page_size, n_sink, n_window, aggregation, has_mask, q_by_row, num_warps, heads_fast, max_pages,
                     blocks_per_program=1, num_stages=2, grid=None, grid_index=None, resident=None, rkeys=None,
                     int8=False):
    """Launch 1 of :func:`score_and_select` (arguments already checked there): the top ``kb`` keys of every
    block of ``block_n`` pages of each (request, KV head) into ``keys [B * Hkv * n_blocks * kb]``,
    ``blocks_per_program`` blocks per program (``grid``: scored from grid codes). With ``rkeys``
    (``[B * Hkv * KR]``, ``KR = max(16, next_pow2(k))``), also the key of each page of ``resident [R+1, Hkv, k]``
    at its slot (the over-fetch correction's merge reads them)."""
    b, hq, d = rows.shape[0], q.shape[1], q.shape[2]
    nb = cdiv(max_pages, block_n)
    npg = cdiv(nb, blocks_per_program)
    launch = (b * hkv, npg) if heads_fast else (npg, b * hkv)
    i8 = grid is not None and int8
    if grid is not None:
        lo, st = grid
        one = grid_index is None and lo.shape[0] == 1  # the one grid: row 0 through zero strides
        gargs = (lo, st, grid_index if grid_index is not None else rows)
        gstrides = (0 if one else lo.stride(0), lo.stride(1), 0 if one else st.stride(0), st.stride(1),
                    LOG2E / math.sqrt(d))
    else:
        gargs = (keys, keys, rows)  # unused pointers
        gstrides = (0, 0, 0, 0, 0.0)
    fill = rkeys is not None
    kres = resident.shape[-1] if fill else 1
    _score_block_topk_kernel[launch](
        q, q_index, digests, req_to_token, rows, n_ctx, head_mask_u8, keys, *gargs,
        resident if fill else keys, rkeys if fill else keys,
        q.stride(0), q.stride(1), req_to_token.stride(0), n_sink, n_window, *gstrides,
        HKV=hkv, G=hq // hkv, BLOCK_G=max(16, next_pow2(hq // hkv)), D=d, PAGE=page_size, BLOCK_N=block_n, KB=kb,
        NB=nb, AGG=0 if aggregation == "mean" else 1, HAS_MASK=has_mask, Q_BY_ROW=q_by_row,
        F32_DOT=interpreter_forced() and (q.dtype == torch.bfloat16 or grid is not None), HEADS_FAST=bool(heads_fast),
        SUB=blocks_per_program, STAGES=num_stages, DSP=digests.stride(0), DSH=digests.stride(1),
        GRID=grid is not None, BLOCK_PG=grid_block_pages(page_size, block_n) if grid is not None else 1,
        HAS_GIDX=grid_index is not None, FILL=fill, KR=max(16, next_pow2(kres)), KRES=kres,
        GRID_BG=grid_block_g(hq // hkv, i8), I8=i8, num_warps=num_warps,
    )


def merge_select(keys, n_ctx, resident, rows, head_mask_u8, recall_slot, recall_page, counter, *, hkv, k, kb, block_n,
                 page_size, n_sink, n_window, has_mask, margin, max_pages, num_warps=None, fill_resident=0, rkeys=None):
    """Launch 2 of :func:`score_and_select`: per (request, KV head), the top ``k`` of its blocks' keys and the
    residency update (recall lists, ``resident`` in place, ``counter``); with ``fill_resident``, the top
    ``k - fill_resident`` and the best resident pages outside them (their keys from launch 1's ``rkeys``)."""
    if fill_resident and (rkeys is None or kb != max(16, next_pow2(k)) or margin):
        raise ValueError("fill_resident needs launch 1's resident keys, blocks of max(16, next_pow2(k)) keys "
                         "and no margin")
    b = rows.shape[0]
    nb = cdiv(max_pages, block_n)
    cb = merge_chunk_blocks(nb, kb)
    _merge_select_kernel[(b * hkv,)](
        keys, n_ctx, resident, rows, head_mask_u8, recall_slot, recall_page,
        counter if counter is not None else recall_slot, rkeys if fill_resident else keys, n_sink, n_window,
        HKV=hkv, K=k, KB=kb, NB=nb, CB=cb, BLOCK_N=block_n, PAGE=page_size,
        HAS_MASK=has_mask, COUNT=counter is not None, MARGIN=margin, KR=max(16, next_pow2(k)), FILL=fill_resident,
        # rows of more than 1024 keys (two chunks or more) merge faster with 8 warps
        num_warps=num_warps or (4 if nb * kb <= 1024 else 8),
    )


MERGE_CHUNK_KEYS = 1024


def merge_chunk_blocks(n_blocks: int, kb: int) -> int:
    """Blocks whose keys the merge sorts at once: all of them up to :data:`MERGE_CHUNK_KEYS` keys (a power
    of two of blocks), else chunks of that many keys, merged one after the other up to the live blocks."""
    return min(next_pow2(n_blocks), max(1, MERGE_CHUNK_KEYS // kb))
