"""Grid codes (``grid2``): 2-bit codes of every key of a page, and the page scores they give.

Math, thresholds and the packed layout: :mod:`freekv_sglang.algorithm.grid_codes` (plain torch).

* :func:`pack_grid_codes` quantizes ``P`` consecutive key rows per listed page into
  ``codes [pages, Hkv, P, D/4]`` uint8, with the interface of :func:`.digests.page_digests_from_rows`
  (``row0``/``dst_page``: a prefill's fresh keys, or a completed working-set page at decode).
* :func:`score_pages_grid` scores every candidate page of each request with the interface of
  :func:`.scores.score_pages`: ``logsumexp`` over the page's tokens of ``q . k_hat / sqrt(D)`` per query
  head, then the GQA aggregation.
* :func:`.score_select.score_and_select` with ``grid=(lo, step)`` scores its blocks the same way
  (:func:`_grid_block_scores`) in the fused scoring + top-k + residency path.

The grid (``lo``, ``step``) is an input ``[n_grids, Hkv, D]`` float32 with any row and head strides:
one grid (``n_grids = 1``, broadcast), one per request, or rows picked by ``grid_index``.

Scoring kernel. One program scores ``BLOCK_N`` pages of one (request, KV head), ``BLOCK_PG`` pages per
step (``BLOCK_PG * P = 128`` token rows for ``P <= 128``). Per step it loads the pages' codes as a
``[BLOCK_PG * P, D/4]`` byte tile (each page-head's ``P * D/4`` bytes are contiguous) and accumulates, for each
quarter ``s`` of the channels, a tensor-core ``tl.dot`` of that quarter's codes with the group's query side.
The logits in base 2 are ``sum_d c_d side_d + const`` with ``side = q * step * log2(e) / sqrt(D)`` and
``const = q . lo * log2(e) / sqrt(D) + 0.5 * sum_d side_d`` (``k_hat = lo + (c + 0.5) step``). The result is seen
as ``[BLOCK_PG, P, heads]``: max, ``exp2`` and sum over the tokens give each page's ``logsumexp``. Two ways
to run the products (``int8`` of :func:`score_pages_grid` and :func:`.score_select.score_and_select`):

* int8 (the default): the codes ``c`` themselves are the int8 left operand, unpacked
  four bytes per 32-bit register (one shift and one mask, inline PTX: the compiler would unpack byte by byte);
  the query side is split per query head into ``side ~ scale * (hi + lo / 254)`` with int8 ``hi``, ``lo`` and
  ``scale = max_d |side_d| / 127``, the two parts as the two halves of an ``[D/4, 2 * BLOCK_G]`` right operand
  (``BLOCK_G = max(8, G)``: 16 columns up to 8 query heads a KV head), int32 accumulation; each head's logit is
  its ``hi`` column times ``scale`` plus its ``lo`` column times ``scale / 254``. One ``k32`` tensor-core step
  per quarter and 64 rows (at head dim 64, one per two quarters, their codes interleaved), half the
  post-processing columns of the bf16 path.
* bf16 (``int8=False``): each quarter's 2-bit field becomes the bf16 value ``1 + c/4`` by bit
  operations (``(byte << (5 - 2s)) & 0x60 | 0x3F80``: the code lands in the two top mantissa bits of bf16 1.0)
  against ``bf16(4 * side)`` (16 columns); since ``c + 0.5 = 4 (1 + c/4) - 3.5`` the constant becomes
  ``q . lo * log2(e) / sqrt(D) - 0.875 * sum_d bf16(4 side_d)``.

Rows of a tile are ordered (16-token slab, page, token) for pages of 16 tokens or more, so that each page's
rows fall into one warp's slices of the tensor-core tiles (pages of 32, 4 warps) and its reductions stay in the
warp; a page's ``logsumexp`` does not depend on the order of its tokens.

Numerics: codes are exact in either path. The query side is rounded: to bf16 (relative error at most 2**-9 per
channel), or to ``scale * (hi + lo / 254)`` (absolute error at most ``scale / 508``, ``2**-16`` of the head's
largest ``|side|``), so a logit may differ from the float32 reference by up to ``3.5 * sum_d |side_d -
rounded(side_d)|`` (the tests' bound), far below the grid's own quantization error. Under Triton's CPU
interpreter the bf16 dots run in fp32 on the same bf16-rounded values and the int8 codes are unpacked by plain
operations.

Not implemented: a per-page grid (``lo``/``step`` per host page, a box per page). It would dequantize the
codes to ``lo_p + (c + 0.5) step_p`` on the M side and keep ``q`` unscaled on the N side (two more
operations per code); the constant per head would become a per-page ``q . lo_p`` column.
"""

from __future__ import annotations

import math

import torch

from freekv_sglang.algorithm.grid_codes import PER_BYTE, grid_scores, pack_codes, quantize_keys
from freekv_sglang.algorithm.scores import AGGREGATIONS

from .common import check_kv_dtype, check_page_size, cdiv, interpreter_forced, is_pow2, next_pow2, sm_count, tl, \
    triton, use_triton
from .scores import _aggregate_reference, _candidate_host_pages, _finish_softmax_mean, _score_dst

#: token rows per tensor-core step of the scoring kernel (pages x P)
ROWS_PER_STEP = 128
LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _pack_grid_codes_kernel(
        src_ptr, row0_ptr, dst_ptr, gidx_ptr, lo_ptr, step_ptr, codes_ptr,
        R, stride_sr, stride_sh, stride_lg, stride_lh, stride_tg, stride_th, stride_cp, stride_ch,
        HAS_GIDX: tl.constexpr, PAGE: tl.constexpr, DQ: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        # grid: (M, Hkv). One program: one page x one KV head, P rows in chunks of BLOCK_P; for each quarter s
        # of the channels the codes of channels s*DQ + j go to bits 2s of byte j.
        m = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        row0 = tl.load(row0_ptr + m).to(tl.int64)
        page = tl.load(dst_ptr + m).to(tl.int64)
        if row0 >= 0:
            if HAS_GIDX:
                gi = tl.load(gidx_ptr + m).to(tl.int64)
            else:
                gi = 0
            j = tl.arange(0, DQ)
            i = tl.arange(0, BLOCK_P)
            lo_row = lo_ptr + gi * stride_lg + h * stride_lh
            st_row = step_ptr + gi * stride_tg + h * stride_th
            out = codes_ptr + page * stride_cp + h * stride_ch
            for c in tl.static_range(0, PAGE, BLOCK_P):
                r = row0 + c + i
                ok = (r < R)[:, None]
                byte = tl.zeros([BLOCK_P, DQ], dtype=tl.int32)
                for s in tl.static_range(4):
                    lo = tl.load(lo_row + s * DQ + j)
                    st = tl.load(st_row + s * DQ + j)
                    t2 = lo + st * 2.0  # as algorithm.grid_codes.grid_thresholds: one rounding each
                    t1 = lo + st
                    t3 = t2 + st
                    x = tl.load(src_ptr + (r * stride_sr + h * stride_sh)[:, None] + (s * DQ + j)[None, :],
                                mask=ok, other=0.0).to(tl.float32)
                    code = (x >= t1[None, :]).to(tl.int32) + (x >= t2[None, :]).to(tl.int32) \
                        + (x >= t3[None, :]).to(tl.int32)
                    byte = byte | (code << (2 * s))
                tl.store(out + (c + i)[:, None] * DQ + j[None, :], byte.to(tl.uint8), mask=ok)

    @triton.jit
    def _round_to_bf16(x):
        """fp32 ``x`` rounded to the nearest bf16 value (ties to even), kept in fp32. Written with integer
        operations: Triton's CPU interpreter truncates in ``.to(tl.bfloat16)``; the GPU rounds as here."""
        u = x.to(tl.int32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) & -65536
        return u.to(tl.float32, bitcast=True)

    @triton.jit
    def _grid_query_side(q_row, stride_qh, lo_row, st_row, qk_scale, S: tl.constexpr, G: tl.constexpr,
                         BLOCK_G: tl.constexpr, DQ: tl.constexpr):
        """Quarter ``S`` of the query side, ``[DQ, BLOCK_G]`` bf16 ``4 * qk_scale * q * step`` (transposed),
        and its part of the per-head constant, ``[BLOCK_G]`` fp32 ``qk_scale * q . lo - 0.875 * sum(side)``."""
        j = tl.arange(0, DQ)
        g = tl.arange(0, BLOCK_G)
        d = S * DQ + j
        qt = tl.load(q_row + g[None, :] * stride_qh + d[:, None], mask=(g < G)[None, :], other=0.0).to(tl.float32)
        lo = tl.load(lo_row + d)
        st = tl.load(st_row + d)
        side = _round_to_bf16(qt * (st * (4.0 * qk_scale))[:, None])
        const = tl.sum(qt * lo[:, None], axis=0) * qk_scale - 0.875 * tl.sum(side, axis=0)
        return side.to(tl.bfloat16), const

    @triton.jit
    def _grid_levels(x16, S: tl.constexpr):
        """bf16 ``1 + c/4`` of the 2-bit field ``S`` of int16 bytes ``x16`` (bit operations only)."""
        if S == 3:
            t = (x16 >> 1) & 0x60
        else:
            t = (x16 << (5 - 2 * S)) & 0x60
        return (t | 0x3F80).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _grid_dot(a, b, acc, F32_DOT: tl.constexpr):
        if F32_DOT:  # Triton's CPU interpreter gets bf16 dots wrong; the same bf16 values in fp32
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _grid_side_i8(q_row, stride_qh, st_row, qk_scale, S: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                      DQ: tl.constexpr):
        """Chunk ``S`` of the exact query side, ``[KC, 2 * BLOCK_G]`` fp32 ``qk_scale * q * step``: column ``n``
        belongs to query head ``n % BLOCK_G`` (each head twice: its high and its low int8 part). A chunk is
        quarter ``S`` (``KC = DQ >= 32`` rows), or with ``DQ = 16`` quarters ``2S`` and ``2S + 1`` interleaved
        (``KC = 32`` rows, row ``k`` = channel ``(2S + k % 2) * 16 + k // 2``: the order of the codes joined
        in :func:`_grid_page_lse`)."""
        KC: tl.constexpr = 32 if DQ < 32 else DQ
        k = tl.arange(0, KC)
        g = tl.arange(0, 2 * BLOCK_G) % BLOCK_G
        if DQ < 32:
            d = (2 * S + k % 2) * DQ + k // 2
        else:
            d = S * DQ + k
        qt = tl.load(q_row + g[None, :] * stride_qh + d[:, None], mask=(g < G)[None, :], other=0.0).to(tl.float32)
        st = tl.load(st_row + d)
        return qt * (st * qk_scale)[:, None]

    @triton.jit
    def _grid_b_i8(side, scale, BLOCK_G: tl.constexpr):
        """int8 ``[DQ, 2 * BLOCK_G]`` tile of one quarter: ``hi = round(side / scale)`` in the first ``BLOCK_G``
        columns, ``lo = round(254 * (side - hi * scale) / scale)`` in the others (``side ~ scale * (hi + lo /
        254)``), and the column sums ``[2 * BLOCK_G]`` of the value it stands for."""
        inv = 1.0 / scale
        hi = tl.floor(side * inv[None, :] + 0.5)
        lo = tl.floor((side - hi * scale[None, :]) * (254.0 * inv)[None, :] + 0.5)
        lo = tl.minimum(tl.maximum(lo, -127.0), 127.0)
        is_hi = (tl.arange(0, 2 * BLOCK_G) < BLOCK_G)[None, :]
        rep = (hi + lo * (1.0 / 254.0)) * scale[None, :]
        return tl.where(is_hi, hi, lo).to(tl.int8), tl.sum(rep, axis=0)

    @triton.jit
    def _grid_query(q_row, stride_qh, lo_row, st_row, qk_scale, G: tl.constexpr, BLOCK_G: tl.constexpr,
                    DQ: tl.constexpr, I8: tl.constexpr):
        """The query side of one (request, KV head) for :func:`_grid_page_lse`: four quarter tiles, the
        per-head constant ``[BLOCK_G]`` and (``I8``) the column weights ``[2 * BLOCK_G]``.

        bf16 (``I8`` off): tiles ``[DQ, BLOCK_G]`` of :func:`_grid_query_side`; the weights are unused.
        int8: each chunk's side (:func:`_grid_side_i8`: four quarters, or two pairs of quarters when ``DQ = 16``)
        as ``scale_g * (hi + lo / 254)`` (``scale_g``: the head's largest ``|side|`` over all channels / 127),
        tiles ``[KC, 2 * BLOCK_G]`` of :func:`_grid_b_i8` (the last two unused with pairs); weights ``scale_g`` for the
        ``hi`` columns and ``scale_g / 254`` for the ``lo`` ones; constant ``qk_scale * q . lo + 0.5 * sum(side)``
        over the represented side."""
        if I8:
            s0 = _grid_side_i8(q_row, stride_qh, st_row, qk_scale, 0, G, BLOCK_G, DQ)
            s1 = _grid_side_i8(q_row, stride_qh, st_row, qk_scale, 1, G, BLOCK_G, DQ)
            amax = tl.maximum(tl.max(tl.abs(s0), axis=0), tl.max(tl.abs(s1), axis=0))
            if DQ >= 32:  # four chunks (quarters); with DQ = 16 two chunks of two quarters each
                s2 = _grid_side_i8(q_row, stride_qh, st_row, qk_scale, 2, G, BLOCK_G, DQ)
                s3 = _grid_side_i8(q_row, stride_qh, st_row, qk_scale, 3, G, BLOCK_G, DQ)
                amax = tl.maximum(amax, tl.maximum(tl.max(tl.abs(s2), axis=0), tl.max(tl.abs(s3), axis=0)))
            scale = tl.where(amax > 0, amax / 127.0, 1.0)
            b0, r0 = _grid_b_i8(s0, scale, BLOCK_G)
            b1, r1 = _grid_b_i8(s1, scale, BLOCK_G)
            if DQ >= 32:
                b2, r2 = _grid_b_i8(s2, scale, BLOCK_G)
                b3, r3 = _grid_b_i8(s3, scale, BLOCK_G)
                rtot = r0 + r1 + r2 + r3
            else:  # unused
                b2, b3 = b0, b1
                rtot = r0 + r1
            g = tl.arange(0, BLOCK_G)
            d = tl.arange(0, 4 * DQ)
            qt = tl.load(q_row + g[None, :] * stride_qh + d[:, None], mask=(g < G)[None, :], other=0.0)
            lo = tl.load(lo_row + d)
            # the represented side's sums are the same in both halves of the columns: take the first
            half = tl.reshape(rtot, [2, BLOCK_G])
            rsum = tl.sum(tl.where((tl.arange(0, 2) == 0)[:, None], half, 0.0), axis=0)
            const = tl.sum(qt.to(tl.float32) * lo[:, None], axis=0) * qk_scale + 0.5 * rsum
            w = tl.where(tl.arange(0, 2 * BLOCK_G) < BLOCK_G, scale, scale * (1.0 / 254.0))
        else:
            b0, c0 = _grid_query_side(q_row, stride_qh, lo_row, st_row, qk_scale, 0, G, BLOCK_G, DQ)
            b1, c1 = _grid_query_side(q_row, stride_qh, lo_row, st_row, qk_scale, 1, G, BLOCK_G, DQ)
            b2, c2 = _grid_query_side(q_row, stride_qh, lo_row, st_row, qk_scale, 2, G, BLOCK_G, DQ)
            b3, c3 = _grid_query_side(q_row, stride_qh, lo_row, st_row, qk_scale, 3, G, BLOCK_G, DQ)
            const = c0 + c1 + c2 + c3
            w = const
        return b0, b1, b2, b3, const, w

    @triton.jit
    def _grid_codes_i8(x, INTERP: tl.constexpr):
        """The four 2-bit fields of uint8 bytes ``x`` as int8 codes ``0..3`` (fields 0..3, four tensors shaped as
        ``x``). On the GPU four bytes per 32-bit register, one shift and one mask per field (the compiler would
        work one byte at a time); ``INTERP``: plain operations for Triton's CPU interpreter, which runs no inline
        assembly."""
        if INTERP:
            c0 = (x & 3).to(tl.int8)
            c1 = ((x >> 2) & 3).to(tl.int8)
            c2 = ((x >> 4) & 3).to(tl.int8)
            c3 = ((x >> 6) & 3).to(tl.int8)
        else:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                "{ and.b32 $0, $4, 0x03030303; shr.b32 $1, $4, 2; and.b32 $1, $1, 0x03030303; "
                "shr.b32 $2, $4, 4; and.b32 $2, $2, 0x03030303; shr.b32 $3, $4, 6; and.b32 $3, $3, 0x03030303; }",
                "=r,=r,=r,=r,r", [x], dtype=(tl.int8, tl.int8, tl.int8, tl.int8), is_pure=True, pack=4)
        return c0, c1, c2, c3

    @triton.jit
    def _grid_page_lse(codes_ptr, hp, h, cand, q0, q1, q2, q3, const, w, stride_cp, stride_ch,
                       PAGE: tl.constexpr, BLOCK_PG: tl.constexpr, DQ: tl.constexpr, BLOCK_G: tl.constexpr,
                       F32_DOT: tl.constexpr, I8: tl.constexpr):
        """``[BLOCK_PG, BLOCK_G]`` fp32 natural-log ``logsumexp`` over each page's tokens of the logits of host
        pages ``hp [BLOCK_PG]`` (KV head ``h``; ``cand``: pages to read, others score garbage) against the query
        side ``q0..q3`` / ``const`` / ``w`` of :func:`_grid_query`.

        bf16: each quarter's codes as the bf16 levels ``1 + c/4`` (:func:`_grid_levels`) times the bf16 side.
        int8 (``I8``): each quarter's codes ``c`` as int8 times the int8 ``hi | lo`` side, one int32 accumulator
        ``[rows, 2 * BLOCK_G]``; the logits are its columns weighted by ``w``, each head's two halves summed.

        Row order: with ``SLABS = PAGE // 16 > 1`` the tile's rows are (slab, page, token within the slab), 16
        tokens a slab, so that a page's rows fall into the 16-row slices one warp holds of each 64-row
        tensor-core tile (pages of 32, 4 per step, 4 warps: page ``w`` is warp ``w``'s) and its ``max`` and
        sum need no exchange between warps. The order of a page's tokens does not change its ``logsumexp``.
        Otherwise (``SLABS`` 0 or 1) rows are (page, token)."""
        SLABS: tl.constexpr = PAGE // 16  # pages are powers of two: 0 below 16 tokens
        j = tl.arange(0, DQ)
        base = hp * stride_cp + h * stride_ch
        if SLABS > 1:  # rows (slab, page, 16 tokens): see the docstring
            sl = tl.arange(0, SLABS)
            i = tl.arange(0, 16)
            tok = (sl * 16)[:, None, None] + i[None, None, :]  # [SLABS, 1, 16]
            ptr = codes_ptr + base[None, :, None, None] + (tok * DQ)[:, :, :, None] + j[None, None, None, :]
            x = tl.load(ptr, mask=cand[None, :, None, None], other=0)
        else:
            t = tl.arange(0, PAGE)
            ptr = codes_ptr + base[:, None, None] + (t * DQ)[None, :, None] + j[None, None, :]
            x = tl.load(ptr, mask=cand[:, None, None], other=0)
        if I8:
            ROWS: tl.constexpr = BLOCK_PG * PAGE
            x2 = tl.reshape(x, [ROWS, DQ])
            iacc = tl.zeros([ROWS, 2 * BLOCK_G], dtype=tl.int32)
            c0, c1, c2, c3 = _grid_codes_i8(x2, F32_DOT)
            if DQ >= 32:
                iacc = tl.dot(c0, q0, iacc, out_dtype=tl.int32)
                iacc = tl.dot(c1, q1, iacc, out_dtype=tl.int32)
                iacc = tl.dot(c2, q2, iacc, out_dtype=tl.int32)
                iacc = tl.dot(c3, q3, iacc, out_dtype=tl.int32)
            else:  # K = 16 per quarter is below an int8 product's 32: quarters (0, 1) and (2, 3) interleaved
                iacc = tl.dot(tl.reshape(tl.join(c0, c1), [ROWS, 32]), q0, iacc, out_dtype=tl.int32)
                iacc = tl.dot(tl.reshape(tl.join(c2, c3), [ROWS, 32]), q1, iacc, out_dtype=tl.int32)
            f = tl.reshape(iacc.to(tl.float32) * w[None, :], [BLOCK_PG * PAGE, 2, BLOCK_G])
            acc = tl.sum(f, axis=1)
        else:
            x16 = tl.reshape(x, [BLOCK_PG * PAGE, DQ]).to(tl.int16)
            acc = tl.zeros([BLOCK_PG * PAGE, BLOCK_G], dtype=tl.float32)
            acc = _grid_dot(_grid_levels(x16, 0), q0, acc, F32_DOT)
            acc = _grid_dot(_grid_levels(x16, 1), q1, acc, F32_DOT)
            acc = _grid_dot(_grid_levels(x16, 2), q2, acc, F32_DOT)
            acc = _grid_dot(_grid_levels(x16, 3), q3, acc, F32_DOT)
        if SLABS > 1:
            s4 = tl.reshape(acc, [SLABS, BLOCK_PG, 16, BLOCK_G])
            mx = tl.max(tl.max(s4, axis=2), axis=0)
            tot = tl.sum(tl.sum(tl.exp2(s4 - mx[None, :, None, :]), axis=2), axis=0)
        else:
            s3 = tl.reshape(acc, [BLOCK_PG, PAGE, BLOCK_G])
            mx = tl.max(s3, axis=1)
            tot = tl.sum(tl.exp2(s3 - mx[:, None, :]), axis=1)
        return (mx + tl.log2(tot) + const[None, :]) * 0.6931471805599453

    @triton.jit
    def _grid_block_scores(q_row, stride_qh, codes_ptr, r2t_row, lo_row, st_row, qk_scale, start, ws, n_sink, live,
                           h, stride_cp, stride_ch, G: tl.constexpr, BLOCK_G: tl.constexpr, DQ: tl.constexpr,
                           PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_PG: tl.constexpr, AGG: tl.constexpr,
                           F32_DOT: tl.constexpr, I8: tl.constexpr):
        """``[BLOCK_N]`` fp32 GQA-aggregated (``AGG`` 0: mean, 1: max) scores of logical pages ``start ..
        start + BLOCK_N`` of one (request, KV head), for the fused selection (``.score_select``); entries of
        pages that are not candidates (``p < n_sink``, ``p >= ws`` or not ``live``) are not meaningful. The
        block is held as ``[BLOCK_N / BLOCK_PG, BLOCK_PG]``; step ``c`` fills row ``c``."""
        q0, q1, q2, q3, const, w = _grid_query(q_row, stride_qh, lo_row, st_row, qk_scale, G, BLOCK_G, DQ, I8)
        gmask = tl.arange(0, BLOCK_G) < G
        i = tl.arange(0, BLOCK_PG)
        NSTEP: tl.constexpr = BLOCK_N // BLOCK_PG
        rows = tl.arange(0, NSTEP)
        res = tl.full([NSTEP, BLOCK_PG], float("-inf"), tl.float32)
        for c in tl.range(0, NSTEP):
            p = start + c * BLOCK_PG + i
            cand = (p >= n_sink) & (p < ws) & live
            hp = tl.load(r2t_row + p.to(tl.int64) * PAGE, mask=cand, other=0).to(tl.int64) // PAGE
            lse = _grid_page_lse(codes_ptr, hp, h, cand, q0, q1, q2, q3, const, w, stride_cp, stride_ch,
                                 PAGE, BLOCK_PG, DQ, BLOCK_G, F32_DOT, I8)
            if AGG == 0:
                agg = tl.sum(tl.where(gmask[None, :], lse, 0.0), axis=1) / G
            else:
                agg = tl.max(tl.where(gmask[None, :], lse, float("-inf")), axis=1)
            res = tl.where((rows == c)[:, None], agg[None, :], res)
        return tl.reshape(res, [BLOCK_N])

    @triton.jit
    def _score_pages_grid_kernel(
        q_ptr, codes_ptr, lo_ptr, step_ptr, gidx_ptr, r2t_ptr, rpi_ptr, nctx_ptr, hmask_ptr, out_ptr,
        stride_qb, stride_qh, stride_lg, stride_lh, stride_tg, stride_th, stride_cp, stride_ch,
        stride_r2t, stride_ob, stride_oh, max_pages, n_sink, n_window, qk_scale,
        HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, DQ: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_PG: tl.constexpr, AGG: tl.constexpr, HAS_MASK: tl.constexpr,
        HAS_GIDX: tl.constexpr, F32_DOT: tl.constexpr, STAGES: tl.constexpr, I8: tl.constexpr,
    ):
        # One program: BLOCK_N pages x one (request, KV head), BLOCK_PG pages per step. Grid
        # (cdiv(max_pages, BLOCK_N), B * Hkv).
        pid_n = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // HKV
        h = bh % HKV
        n = tl.load(nctx_ptr + b).to(tl.int64)
        n_pages = (n + PAGE - 1) // PAGE
        ws = tl.maximum(n_pages - n_window, n_sink)
        act = True
        if HAS_MASK:
            act = tl.load(hmask_ptr + bh) != 0
        g = tl.arange(0, BLOCK_G)
        gmask = g < G
        i = tl.arange(0, BLOCK_PG)
        neg_inf = float("-inf")
        start = pid_n * BLOCK_N
        if act & (start < ws):
            if HAS_GIDX:
                gi = tl.load(gidx_ptr + b).to(tl.int64)
            else:
                gi = b
            q_row = q_ptr + b * stride_qb + h * G * stride_qh
            lo_row = lo_ptr + gi * stride_lg + h * stride_lh
            st_row = step_ptr + gi * stride_tg + h * stride_th
            q0, q1, q2, q3, const, w = _grid_query(q_row, stride_qh, lo_row, st_row, qk_scale, G, BLOCK_G, DQ, I8)
            r2t_row = r2t_ptr + tl.load(rpi_ptr + b).to(tl.int64) * stride_r2t
            for c in tl.range(0, BLOCK_N, BLOCK_PG, num_stages=STAGES):
                p = start + c + i
                in_range = p < max_pages
                cand = in_range & (p >= n_sink) & (p < ws)
                hp = tl.load(r2t_row + p.to(tl.int64) * PAGE, mask=cand, other=0).to(tl.int64) // PAGE
                lse = _grid_page_lse(codes_ptr, hp, h, cand, q0, q1, q2, q3, const, w, stride_cp, stride_ch,
                                     PAGE, BLOCK_PG, DQ, BLOCK_G, F32_DOT, I8)
                if AGG == 2:
                    o = out_ptr + b * stride_ob + (h * G + g)[None, :] * stride_oh + p[:, None]
                    tl.store(o, tl.where(cand[:, None], lse, neg_inf), mask=in_range[:, None] & gmask[None, :])
                else:
                    if AGG == 0:
                        agg = tl.sum(tl.where(gmask[None, :], lse, 0.0), axis=1) / G
                    else:
                        agg = tl.max(tl.where(gmask[None, :], lse, neg_inf), axis=1)
                    tl.store(out_ptr + b * stride_ob + h * stride_oh + p, tl.where(cand, agg, neg_inf),
                             mask=in_range)
        else:  # no candidate in this block, or a head the mask leaves alone
            p = start + tl.arange(0, BLOCK_N)
            in_range = p < max_pages
            if AGG == 2:
                o = out_ptr + b * stride_ob + (h * G + g)[None, :] * stride_oh + p[:, None]
                tl.store(o, tl.full([BLOCK_N, BLOCK_G], neg_inf, tl.float32),
                         mask=in_range[:, None] & gmask[None, :])
            else:
                tl.store(out_ptr + b * stride_ob + h * stride_oh + p, tl.full([BLOCK_N], neg_inf, tl.float32),
                         mask=in_range)


#: Smallest page the grid-scoring kernels are checked for on a GPU. On an H100 (commit 5597fbb) the score
#: kernel's tests failed at pages of 8 and 16 tokens (head dim 64) and the runtime's at pages of 4, while pages
#: of 32 (head dims 64 and 128) and 256 pass; the cause is not yet found, so smaller pages are refused there.
GPU_MIN_PAGE = 32


def check_grid_page_size(page_size: int, device: torch.device | str) -> None:
    """Refuse pages the grid-scoring kernels have not passed their GPU checks at (:data:`GPU_MIN_PAGE`)."""
    if torch.device(device).type == "cuda" and page_size < GPU_MIN_PAGE:
        raise NotImplementedError(f"grid2 page scoring with pages of {page_size} tokens is not supported on the GPU "
                                  f"yet (its kernel checks fail below {GPU_MIN_PAGE}-token pages): use "
                                  f"--freekv-page-size {GPU_MIN_PAGE} or more, or --freekv-page-scoring quest")


def check_grid_head_dim(d: int) -> None:
    if not is_pow2(d) or d < 64:
        raise NotImplementedError(f"head dim {d} is not supported by the grid-code kernels: need a power of two "
                                  ">= 64 (each quarter of the channels is a dot of K >= 16)")


def _check_grid(lo: torch.Tensor, step: torch.Tensor, hkv: int, d: int) -> None:
    if lo.dim() != 3 or lo.shape[1:] != (hkv, d) or step.shape != lo.shape:
        raise ValueError(f"lo/step must be [n_grids, Hkv, D] = [*, {hkv}, {d}], got {tuple(lo.shape)} / "
                         f"{tuple(step.shape)}")
    if lo.dtype != torch.float32 or step.dtype != torch.float32 or lo.stride(2) != 1 or step.stride(2) != 1:
        raise ValueError("lo/step must be float32 with contiguous channels")


def check_grid_codes_args(q: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor,
                          grid_index: torch.Tensor | None, b: int, page_size: int) -> None:
    """Shapes and dtypes of a scoring call's codes and grid (``b`` requests; ``q`` ``[*, Hq, D]``)."""
    hq, d = q.shape[1:]
    hkv = codes.shape[1] if codes.dim() == 4 else 0
    if codes.dim() != 4 or codes.shape[2:] != (page_size, d // PER_BYTE) or codes.dtype != torch.uint8 \
            or not hkv or hq % hkv:
        raise ValueError(f"shape/dtype mismatch: q {tuple(q.shape)}, codes {tuple(codes.shape)} {codes.dtype} "
                         f"(want uint8 [pages, Hkv, {page_size}, {d // PER_BYTE}])")
    _check_grid(lo, step, hkv, d)
    if grid_index is not None and grid_index.shape != (b,):
        raise ValueError(f"grid_index must be [B] = [{b}], got {tuple(grid_index.shape)}")
    if grid_index is None and lo.shape[0] not in (1, b):
        raise ValueError(f"{lo.shape[0]} grids for {b} requests: pass grid_index")


def _grid_rows(t: torch.Tensor, n: int, index: torch.Tensor | None) -> torch.Tensor:
    """``[n, Hkv, D]`` grid rows: ``t[index]``, or ``t`` broadcast (one row) / as is (``n`` rows)."""
    if index is not None:
        return t[index.to(t.device).long()]
    if t.shape[0] not in (1, n):
        raise ValueError(f"{t.shape[0]} grids for {n} entries: pass grid_index")
    return t.expand(n, *t.shape[1:])


def pack_grid_codes_reference(src, row0, dst_page, codes, lo, step, *, page_size, grid_index=None):
    """Plain-torch :func:`pack_grid_codes` (any device), built on ``algorithm.grid_codes``."""
    row0 = row0.to(src.device).long()
    valid = row0 >= 0
    m = int(valid.sum())
    if m == 0:
        return
    hkv, d = src.shape[1:]
    rows = (row0[valid][:, None] + torch.arange(page_size, device=src.device)).reshape(-1)
    gi = grid_index.to(src.device)[valid] if grid_index is not None else None
    lo_m = _grid_rows(lo.to(src.device), m, gi)  # [M', Hkv, D]
    st_m = _grid_rows(step.to(src.device), m, gi)
    keys = src[rows].view(m, page_size, hkv, d)
    c = quantize_keys(keys, lo_m[:, None], st_m[:, None])  # [M', P, Hkv, D]
    packed = pack_codes(c).permute(0, 2, 1, 3)  # [M', Hkv, P, D/4]
    codes[dst_page.to(codes.device).long()[valid.to(codes.device)]] = packed.to(codes.device)


def pack_grid_codes(src: torch.Tensor, row0: torch.Tensor, dst_page: torch.Tensor, codes: torch.Tensor,
                    lo: torch.Tensor, step: torch.Tensor, *, page_size: int, grid_index: torch.Tensor | None = None,
                    impl: str | None = None) -> None:
    """Quantize ``P`` consecutive rows of ``src`` per listed page into ``codes``, in place.

    For each listed page ``m`` (``row0[m] >= 0``) and KV head ``h``, with grid row ``gi = grid_index[m]``
    (``0`` without ``grid_index``)::

        codes[dst_page[m], h, i, :] = pack(quantize(src[row0[m] + i, h, :], lo[gi, h], step[gi, h]))

    Args:
        src: ``[R, Hkv, D]`` bf16/fp16 keys (rows may be strided; channels contiguous): a prefill's fresh
            keys (pages start at multiples of ``P``) or ``ws_k.view(-1, Hkv, D)`` (slot ``s`` = rows ``s*P ..``).
        row0: int ``[M]`` first row of each page; ``< 0`` = skip (callers list whole pages; rows past ``R`` are
            not written).
        dst_page: int ``[M]`` host page of each entry (first index of ``codes``).
        codes: uint8 ``[n_host_pages, Hkv, P, D/4]``; each page-head ``[P, D/4]`` contiguous (any page and
            head strides). Written at the listed pages only.
        lo, step: float32 ``[n_grids, Hkv, D]`` grid (any row/head strides, channels contiguous).
        grid_index: int ``[M]`` grid row of each page; ``None`` needs ``n_grids == 1``.
    """
    r, hkv, d = src.shape
    m = row0.shape[0]
    if codes.dim() != 4 or codes.shape[1:] != (hkv, page_size, d // PER_BYTE) or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8 [pages, {hkv}, {page_size}, {d // PER_BYTE}], got "
                         f"{tuple(codes.shape)} {codes.dtype}")
    if dst_page.shape != (m,) or (grid_index is not None and grid_index.shape != (m,)):
        raise ValueError(f"row0 {tuple(row0.shape)}, dst_page {tuple(dst_page.shape)} and grid_index must match")
    _check_grid(lo, step, hkv, d)
    if grid_index is None and lo.shape[0] != 1:
        raise ValueError(f"{lo.shape[0]} grids: pass grid_index")
    if not use_triton(impl, src, row0, dst_page, codes):
        return pack_grid_codes_reference(src, row0, dst_page, codes, lo, step, page_size=page_size,
                                         grid_index=grid_index)
    check_grid_head_dim(d)
    check_page_size(page_size)
    check_kv_dtype(src.dtype)
    if codes.stride(3) != 1 or codes.stride(2) != d // PER_BYTE:
        raise ValueError("each page-head [P, D/4] of codes must be contiguous")
    if src.stride(2) != 1:
        src = src.contiguous()
    if m == 0:
        return
    # the kernel reads the page lists at element offsets: make them contiguous (a column of a [M, 2] table is not)
    row0, dst_page = row0.contiguous(), dst_page.contiguous()
    grid_index = grid_index.contiguous() if grid_index is not None else None
    dq = d // PER_BYTE
    block_p = min(page_size, max(1, 4096 // d))
    gidx = grid_index if grid_index is not None else row0  # dummy pointer when absent
    _pack_grid_codes_kernel[(m, hkv)](
        src, row0, dst_page, gidx, lo, step, codes, r, src.stride(0), src.stride(1),
        lo.stride(0), lo.stride(1), step.stride(0), step.stride(1), codes.stride(0), codes.stride(1),
        HAS_GIDX=grid_index is not None, PAGE=page_size, DQ=dq, BLOCK_P=block_p, num_warps=4,
    )


def score_pages_grid_reference(q, codes, lo, step, req_to_token, req_pool_idx, n_ctx, head_mask, out, *, page_size,
                               n_sink, n_window, aggregation, grid_index=None):
    """Plain-torch :func:`score_pages_grid` (any device): ``algorithm.grid_codes.grid_scores`` of the
    candidates' codes + ``aggregate_gqa``."""
    b, hq, d = q.shape
    valid, hp = _candidate_host_pages(req_to_token, req_pool_idx, n_ctx, out.shape[2], page_size, n_sink, n_window,
                                      q.device)
    lo_b = _grid_rows(lo.to(q.device), b, grid_index)
    st_b = _grid_rows(step.to(q.device), b, grid_index)
    s = grid_scores(q, codes[hp.to(codes.device)].to(q.device), lo_b, st_b)  # [B, Hq, Np]
    return _aggregate_reference(s, codes.shape[1], aggregation, valid, d, head_mask, out)


def grid_block_g(g: int, int8: bool) -> int:
    """Query-head columns of the scoring tiles: the int8 path keeps each head twice (``hi``/``lo``) in a dot of
    ``N = 2 * BLOCK_G >= 16`` columns, the bf16 path one column per head, ``N = BLOCK_G >= 16``."""
    return max(8 if int8 else 16, next_pow2(g))


def grid_block_pages(page_size: int, block_n: int) -> int:
    """Pages per tensor-core step: :data:`ROWS_PER_STEP` token rows (one page when ``P`` is larger)."""
    return min(block_n, max(1, ROWS_PER_STEP // page_size))


def score_pages_grid(q: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_idx: torch.Tensor, n_ctx: torch.Tensor,
                     head_mask: torch.Tensor | None, out: torch.Tensor, *, page_size: int, n_sink: int,
                     n_window: int, aggregation: str, grid_index: torch.Tensor | None = None,
                     head_scores: torch.Tensor | None = None, block_n: int | None = None,
                     block_pages: int | None = None, num_warps: int = 4, num_stages: int = 3,
                     int8: bool = True, impl: str | None = None) -> torch.Tensor:
    """GQA-aggregated ``grid2`` scores of every candidate page of each request (see module docstring).

    Args:
        q: ``[B, Hq, D]`` post-RoPE queries, bf16/fp16 (rows/heads may be strided).
        codes: uint8 ``[n_host_pages, Hkv, P, D/4]`` packed codes (:func:`pack_grid_codes`), indexed by host
            page; each page-head ``[P, D/4]`` contiguous, any page and head strides.
        lo, step: float32 ``[n_grids, Hkv, D]`` grid (any row/head strides, channels contiguous): one grid
            (``n_grids = 1``), one per request (``n_grids = B``), or rows ``grid_index [B]``.
        req_to_token, req_pool_idx, n_ctx, head_mask, out, page_size, n_sink, n_window, aggregation,
        head_scores: as :func:`.scores.score_pages` (candidates, ``-inf`` elsewhere and for masked heads).
        block_n: pages per program (a power of two >= 16; default: the largest of 16..64 that still gives two
            programs per SM); block_pages: pages per tensor-core step (default :func:`grid_block_pages`);
            num_warps, num_stages: the program's warps and software-pipeline depth (tuning only);
            int8: the products in int8 (the default) or bf16.
    Returns ``out``. No host synchronisation (graph-capturable).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown GQA aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    b, hq, d = q.shape
    hkv = codes.shape[1]
    max_pages = out.shape[2]
    check_grid_codes_args(q, codes, lo, step, grid_index, b, page_size)
    if out.shape[:2] != (b, hkv) or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 [B, Hkv, max_pages], got {tuple(out.shape)} {out.dtype}")
    if max_pages * page_size > req_to_token.shape[1]:
        raise ValueError(f"out has {max_pages} pages but req_to_token rows hold only {req_to_token.shape[1]} tokens")
    if head_mask is not None and (head_mask.shape != (b, hkv) or head_mask.dtype != torch.bool):
        raise ValueError(f"head_mask must be bool [B, Hkv] = {(b, hkv)}, got {tuple(head_mask.shape)}")
    if not use_triton(impl, q, codes, out):
        return score_pages_grid_reference(q, codes, lo, step, req_to_token, req_pool_idx, n_ctx, head_mask, out,
                                          page_size=page_size, n_sink=n_sink, n_window=n_window,
                                          aggregation=aggregation, grid_index=grid_index)
    check_grid_head_dim(d)
    check_grid_page_size(page_size, q.device)
    check_page_size(page_size)
    check_kv_dtype(q.dtype)
    if codes.stride(3) != 1 or codes.stride(2) != d // PER_BYTE or not out.is_contiguous() \
            or req_to_token.stride(1) != 1:
        raise ValueError("each page-head [P, D/4] of codes must be contiguous, out contiguous, req_to_token rows "
                         "contiguous")
    if q.stride(2) != 1:
        q = q.contiguous()
    g = hq // hkv
    agg, head_scores, dst = _score_dst(aggregation, head_scores, out, b, hq, max_pages)
    if b == 0 or max_pages == 0:
        return out
    if block_n is None:  # 64 pages a program (the best of the shapes swept at 32K x 8, H100), fewer when
        block_n = 64     # that leaves less than two programs per SM
        while block_n > 16 and cdiv(max_pages, block_n) * b * hkv < 2 * sm_count(out.device):
            block_n //= 2
    if not is_pow2(block_n) or block_n < 16:
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    bpg = grid_block_pages(page_size, block_n) if block_pages is None else block_pages
    if not is_pow2(bpg) or block_n % bpg or bpg * page_size < 16:
        raise ValueError(f"block_pages={bpg} must be a power of two dividing block_n={block_n}, with "
                         f"block_pages * page_size >= 16")
    hmask = head_mask.contiguous().view(torch.uint8) if head_mask is not None else out  # dummy pointer when absent
    gidx = grid_index if grid_index is not None else req_pool_idx  # dummy pointer when absent
    stride_lg = lo.stride(0) if lo.shape[0] > 1 or grid_index is not None else 0
    stride_tg = step.stride(0) if step.shape[0] > 1 or grid_index is not None else 0
    _score_pages_grid_kernel[(cdiv(max_pages, block_n), b * hkv)](
        q, codes, lo, step, gidx, req_to_token, req_pool_idx, n_ctx, hmask, dst,
        q.stride(0), q.stride(1), stride_lg, lo.stride(1), stride_tg, step.stride(1), codes.stride(0),
        codes.stride(1), req_to_token.stride(0), dst.stride(0), dst.stride(1), max_pages, n_sink, n_window,
        LOG2E / math.sqrt(d),
        HKV=hkv, G=g, BLOCK_G=grid_block_g(g, int8), DQ=d // PER_BYTE, PAGE=page_size, BLOCK_N=block_n,
        BLOCK_PG=bpg, AGG=agg, HAS_MASK=head_mask is not None, HAS_GIDX=grid_index is not None,
        F32_DOT=interpreter_forced(), STAGES=num_stages, I8=bool(int8), num_warps=num_warps,
    )
    if agg == 2:
        _finish_softmax_mean(head_scores, out, n_ctx, head_mask, page_size=page_size, n_sink=n_sink,
                             n_window=n_window, head_dim=d)
    return out
