"""Compile every Triton kernel for an H100 (sm_90) on the CPU: PTX and cubin via ptxas.

No GPU is needed to lower a kernel; this catches type and layout errors of the GPU code
path that Triton's interpreter does not model (e.g. bf16 tensor-core dots), for the
constexpr combinations the wrappers use (bf16/fp16, D 64/128, several page sizes and
group sizes).
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernels are interpreted in this process", allow_module_level=True)


from freekv_sglang.kernels import (digests, kv_store, page_table, recall, score_select, scores,  # noqa: E402
                                   select, synthetic_query)

TY = {"bf16": "*bf16", "fp16": "*fp16"}


def _compile(fn, sig: dict, constexprs: dict, num_warps=4, div16=()):
    """Lower ``fn`` for sm_90. Like the JIT at run time, pointer arguments (and the integer
    arguments named in ``div16``, e.g. strides that are multiples of 16) carry the
    ``tt.divisibility=16`` hint that enables vectorised accesses."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: ("constexpr" if n in constexprs else sig[n]) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and (sig[n].startswith("*") or n in div16)}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except RuntimeError as e:  # pragma: no cover - toolchain missing (no ptxas)
        if "ptxas" in str(e).lower():
            pytest.skip(f"no ptxas: {e}")
        raise
    assert "cubin" in k.asm and len(k.asm["cubin"]) > 0
    return k


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("p,d,tiered,fp8", [(32, 128, False, False), (8, 64, False, False), (256, 128, False, False),
                                            (32, 128, True, False), (32, 128, True, True), (32, 64, False, True)])
def test_compile_store(dt, p, d, tiered, fp8):
    t = TY[dt]
    h = "*fp8e4nv" if fp8 else t
    sig = dict(k_ptr=t, v_ptr=t, loc_ptr="*i64", hk_ptr=h, hv_ptr=h, gk_ptr=h, gv_ptr=h, T="i32", stride_kt="i32",
               stride_kh="i32", stride_vt="i32", stride_vh="i32", n_host="i32", n_items="i32", n_iters="i32",
               n_programs="i32")
    _compile(kv_store._store_kv_host_kernel, sig,
             dict(HKV=8, PAGE=p, D=d, BLOCK_T=32, TIERED=tiered, ITERS=0, FP8=fp8),
             div16=("stride_kt", "stride_kh", "stride_vt", "stride_vh"))


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("p,d", [(32, 128), (8, 64), (256, 128)])
def test_compile_digests(dt, p, d):
    t = TY[dt]
    sig = dict(src_ptr=t, row0_ptr="*i32", dst_ptr="*i64", dig_ptr=t, R="i32", stride_sr="i32", stride_sh="i32")
    _compile(digests._page_digests_kernel, sig, dict(HKV=8, PAGE=p, D=d, BLOCK_P=min(p, 4096 // d)),
             div16=("stride_sr", "stride_sh"))


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("agg", [0, 1, 2])
@pytest.mark.parametrize("g,d,has_mask", [(4, 128, True), (7, 64, False), (1, 128, True)])
@pytest.mark.parametrize("head_major", [False, True])
def test_compile_scores(dt, agg, g, d, has_mask, head_major):
    t = TY[dt]
    # head-major digests of a 4097-page pool: page stride 2 * D, head stride 4097 * 2 * D
    strides = dict(DSP=2 * d, DSH=4097 * 2 * d) if head_major else dict(DSP=8 * 2 * d, DSH=2 * d)
    sig = dict(q_ptr=t, dig_ptr=t, r2t_ptr="*i32", rpi_ptr="*i64", nctx_ptr="*i32", hmask_ptr="*u8",
               out_ptr="*fp32", stride_qb="i32", stride_qh="i32", stride_r2t="i32", stride_ob="i32",
               stride_oh="i32", max_pages="i32", n_sink="i32", n_window="i32")
    k = _compile(scores._score_pages_kernel, sig,
                 dict(HKV=8, G=g, BLOCK_G=16, D=d, PAGE=32, BLOCK_N=64, AGG=agg, HAS_MASK=has_mask, F32_DOT=False,
                      HEADS_FAST=agg == 1, **strides),
                 div16=("stride_qb", "stride_qh", "stride_r2t", "stride_ob", "stride_oh"))
    # the bound is computed on tensor cores (wgmma/mma), not unrolled scalar FMAs
    assert "mma" in k.asm["ptx"]


@pytest.mark.parametrize("k,kb,has_mask", [(32, 32, True), (12, 16, False), (64, 64, True), (128, 128, False)])
def test_compile_residency(k, kb, has_mask):
    sig = dict(val_ptr="*fp32", idx_ptr="*i64", res_ptr="*i64", rows_ptr="*i64", hmask_ptr="*u8", rslot_ptr="*i32",
               rpage_ptr="*i32", cnt_ptr="*i64")
    _compile(select._select_update_kernel, sig, dict(HKV=8, K=k, KB=kb, HAS_MASK=has_mask, COUNT=has_mask),
             num_warps=4 if kb <= 64 else 8)


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("p,d,tiered,fp8", [(32, 128, False, False), (8, 64, False, False), (256, 128, False, False),
                                            (32, 128, True, False), (32, 128, True, True)])
def test_compile_recall(dt, p, d, tiered, fp8):
    t = TY[dt]
    h = "*fp8e4nv" if fp8 else t
    sig = dict(src_k=h, src_v=h, dst_k=t, dst_v=t, page_ptr="*i32", slot_ptr="*i32", head_ptr="*i32", gk_ptr=h,
               gv_ptr=h, n_rows="i32", n_iters="i32", n_programs="i32", src_page_stride="i64", src_head_stride="i32",
               dst_slot_stride="i32", dst_row_stride="i32", n_host="i32")
    _compile(recall._recall_rows_kernel, sig,
             dict(PAGE=p, D=d, BLOCK_R=min(8192 // d, 256), ITERS=0, TIERED=tiered),
             div16=("src_page_stride", "src_head_stride", "dst_slot_stride", "dst_row_stride"))


@pytest.mark.parametrize("p,bb,bs", [(32, 64, 64), (8, 1, 16), (256, 512, 128)])
def test_compile_page_table(p, bb, bs):
    sig = dict(seq_ptr="*i32", rpi_ptr="*i64", indptr_ptr="*i32", indices_ptr="*i32", last_ptr="*i32",
               B="i32", slot_base="i32", n_sink="i32", n_select="i32", n_window="i32")
    _compile(page_table._page_table_kernel, sig, dict(PAGE=p, BLOCK_B=bb, BLOCK_S=bs), num_warps=1)


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("agg", [0, 1])
@pytest.mark.parametrize("g,d,bn,kb,by_row,sub,stages", [(4, 128, 128, 32, True, 1, 2), (7, 64, 64, 16, False, 1, 2),
                                                        (1, 128, 512, 64, True, 1, 2), (4, 128, 64, 32, False, 2, 3),
                                                        (3, 64, 32, 16, True, 4, 2)])
@pytest.mark.parametrize("head_major", [False, True])
def test_compile_score_block_topk(dt, agg, g, d, bn, kb, by_row, sub, stages, head_major):
    t = TY[dt]
    strides = dict(DSP=2 * d, DSH=4097 * 2 * d) if head_major else dict(DSP=8 * 2 * d, DSH=2 * d)
    sig = dict(q_ptr=t, qidx_ptr="*i64", dig_ptr=t, r2t_ptr="*i32", rows_ptr="*i64", nctx_ptr="*i64",
               hmask_ptr="*u8", keys_ptr="*i64", lo_ptr="*fp32", st_ptr="*fp32", gidx_ptr="*i64", res_ptr="*i64",
               rkeys_ptr="*i64", stride_qb="i32", stride_qh="i32", stride_r2t="i32", n_sink="i32", n_window="i32",
               stride_lg="i32", stride_lh="i32", stride_tg="i32", stride_th="i32", qk_scale="fp32")
    fill = kb >= 32 and sub == 1  # also the resident pages' keys (the over-fetch correction)
    k = _compile(score_select._score_block_topk_kernel, sig,
                 dict(HKV=8, G=g, BLOCK_G=16, D=d, PAGE=32, BLOCK_N=bn, KB=kb, NB=32, AGG=agg, HAS_MASK=not by_row,
                      Q_BY_ROW=by_row, F32_DOT=False, HEADS_FAST=sub == 2, SUB=sub, STAGES=stages, GRID=False,
                      BLOCK_PG=1, HAS_GIDX=False, FILL=fill, KR=kb, KRES=kb - 8, GRID_BG=16, I8=False, **strides),
                 div16=("stride_qb", "stride_qh", "stride_r2t"))
    assert "mma" in k.asm["ptx"]


@pytest.mark.parametrize("k,kb,nb,has_mask,margin,fill", [(32, 32, 32, True, 0, 0), (5, 16, 7, False, 0, 0),
                                                          (64, 64, 16, True, 0, 0), (32, 64, 16, True, 8, 0),
                                                          (5, 16, 7, False, 3, 0), (32, 32, 64, True, 0, 0),
                                                          (32, 64, 64, True, 4, 0), (48, 64, 32, True, 0, 16),
                                                          (5, 16, 7, False, 0, 2)])
def test_compile_merge_select(k, kb, nb, has_mask, margin, fill):
    sig = dict(keys_ptr="*i64", nctx_ptr="*i64", res_ptr="*i64", rows_ptr="*i64", hmask_ptr="*u8",
               rslot_ptr="*i32", rpage_ptr="*i32", cnt_ptr="*i64", rkeys_ptr="*i64", n_sink="i32", n_window="i32")
    cb = score_select.merge_chunk_blocks(nb, kb)  # 64 blocks: chunks of 1024 keys merged in a loop
    _compile(score_select._merge_select_kernel, sig,
             dict(HKV=8, K=k, KB=kb, NB=nb, CB=cb, BLOCK_N=128, PAGE=32, HAS_MASK=has_mask, COUNT=True,
                  MARGIN=margin, KR=max(16, 1 << (k - 1).bit_length()), FILL=fill),
             num_warps=4 if nb * kb <= 1024 else 8)


@pytest.mark.parametrize("dt,p,d,w", [("bf16", 32, 128, 8), ("fp16", 32, 128, 8), ("bf16", 16, 64, 8),
                                      ("fp16", 16, 64, 8), ("bf16", 256, 128, 8), ("fp16", 256, 128, 8),
                                      ("bf16", 32, 128, 2), ("bf16", 32, 128, 1)])
@pytest.mark.parametrize("tiered,fp8", [(False, False), (True, False), (True, True)])
def test_compile_recall_selected(dt, p, d, w, tiered, fp8):
    t = TY[dt]
    h = "*fp8e4nv" if fp8 else t
    sig = dict(hk_ptr=h, hv_ptr=h, wk_ptr=t, wv_ptr=t, rslot_ptr="*i32", rpage_ptr="*i32", rows_ptr="*i64",
               r2t_ptr="*i32", r2t_stride="i32", gk_ptr=h, gv_ptr=h, n_lists="i32", n_iters="i32",
               n_programs="i32", n_host="i32")
    _compile(recall._recall_selected_kernel, sig,
             dict(HKV=8, K=32, PAGE=p, D=d, SLOT_BASE=64, SLOT0=16, CH=max(1, 16 * w // p), ITERS=0,
                  TIERED=tiered),
             num_warps=w, div16=("r2t_stride",))


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("hq,d", [(32, 128), (9, 64), (28, 128)])
def test_compile_synthetic_query(dt, hq, d):
    t = TY[dt]
    sig = dict(q_ptr=t, u_ptr="*fp32", rows_ptr="*i64", out_ptr=t, stride_qb="i32", stride_qh="i32",
               stride_ob="i32", stride_oh="i32", n_slots="i32", sigma="fp32")
    _compile(synthetic_query._mix_kernel, sig, dict(HQ=hq, BLOCK_H=1 << (hq - 1).bit_length(), D=d))


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("hq,g,d", [(32, 4, 128), (9, 3, 64), (28, 7, 128), (8, 1, 64)])
def test_compile_calibrated_synthetic_query(dt, hq, g, d):
    t = TY[dt]
    sig = dict(prev_ptr=t, u_ptr="*fp32", noise_ptr="*fp32", quant_ptr="*fp32", kappa_ptr="*fp32", rows_ptr="*i64",
               n_ptr="*i64", out_ptr=t, stride_pr="i32", stride_ph="i32", stride_ob="i32", stride_oh="i32",
               n_slots="i32", n_noise="i32", n_bins="i32", seed_layer="i64", seed_noise_layer="i64", bin0="fp32",
               decoy="fp32", pull="fp32")
    _compile(synthetic_query._calibrated_kernel, sig,
             dict(HQ=hq, BLOCK_H=1 << (hq - 1).bit_length(), D=d, G=g, ND=synthetic_query.n_decoys(g), NQ=101))


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("g,d,tiered,fp8,digest", [(4, 128, False, False, True), (4, 128, True, False, True),
                                                   (7, 64, True, False, True), (1, 64, False, False, True),
                                                   (4, 128, True, True, True), (3, 64, False, True, True),
                                                   (4, 128, False, False, False), (4, 128, True, True, False)])
def test_compile_decode_prologue(dt, g, d, tiered, fp8, digest):
    from freekv_sglang.kernels import decode_prologue

    t = TY[dt]
    h = "*fp8e4nv" if fp8 else t
    sig = dict(q_ptr=t, k_ptr=t, v_ptr=t, loc_ptr="*i64", rows_ptr="*i64", n_ptr="*i64", slot_ptr="*i64",
               hk_ptr=h, hv_ptr=h, gk_ptr=h, gv_ptr=h, wk_ptr=t, wv_ptr=t, dig_ptr=t, qprev_ptr=t, qvalid_ptr="*u8",
               flags_ptr="*i8", spec_ptr="*i8", cnt_ptr="*i64", tau="fp32", n_host="i32")
    _compile(decode_prologue._decode_prologue_kernel, sig,
             dict(HKV=8, G=g, GB=max(2, 1 << (g - 1).bit_length()), D=d, PAGE=32, HAS_TAU=True, SPECULATIVE=True,
                  COUNT=True, TIERED=tiered, FP8=fp8, DIGEST=digest))


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("block,warps,stages", [(4096, 8, 3), (2048, 4, 2), (8192, 8, 4)])
def test_compile_stream_sum(dt, block, warps, stages):
    from freekv_sglang.kernels import stream_read

    sig = dict(x_ptr=TY[dt], out_ptr="*fp32", n="i64")
    _compile(stream_read._stream_sum_kernel, sig, dict(BLOCK=block, ITERS=7, STAGES=stages), num_warps=warps)
