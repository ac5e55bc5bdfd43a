"""The grid-code kernels (``kernels/grid_codes.py``) under Triton's CPU interpreter, against their torch
references (checks in ``tests/grid_cases.py``, shared with ``tests/gpu/test_kernels_grid_codes_gpu.py``).

As ``tests/test_kernels_interpreter.py``, this module re-runs itself in a fresh interpreter with
``TRITON_INTERPRET=1`` (one parent test). Run the child directly with
``TRITON_INTERPRET=1 pytest tests/test_kernels_grid_codes.py``.
"""

from __future__ import annotations

import os
import sys

import pytest

CHILD = os.environ.get("TRITON_INTERPRET") == "1"

if not CHILD:

    def test_grid_kernels_under_interpreter(module_under_interpreter):
        module_under_interpreter(__file__)

else:

    import torch

    from freekv_sglang.kernels import grid_codes as gc  # noqa: E402

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from grid_cases import check_pack, check_score_select_grid, check_scores, random_grid  # noqa: E402

    DTYPES = (torch.bfloat16, torch.float16)
    LARGE_Q_SCALE = 64.0  # as tests/kernel_cases.py: logits with a standard deviation in the hundreds

    def test_interpreter_is_on():
        from freekv_sglang.kernels.common import interpreter_forced
        assert interpreter_forced()
        assert type(gc._score_pages_grid_kernel).__name__ == "InterpretedFunction"

    # ------------------------------------------------------------------------------ pack
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("p,hkv,d,rows", [(8, 2, 64, 1), (32, 3, 128, 1), (16, 1, 64, 3), (256, 1, 128, 2)])
    def test_pack(dtype, p, hkv, d, rows):
        check_pack("cpu", dtype, p, hkv, d, seed=p + d, grid_rows=rows, zero_step=rows == 3)

    def test_pack_refuses_small_head_dim_and_bad_layouts():
        keys = torch.randn(16, 1, 32).bfloat16()
        lo, st = random_grid(torch.Generator().manual_seed(0), 1, 1, 32)
        with pytest.raises(NotImplementedError, match="head dim"):
            gc.pack_grid_codes(keys, torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                               torch.zeros(1, 1, 16, 8, dtype=torch.uint8), lo, st, page_size=16, impl="triton")
        keys = torch.randn(16, 1, 64).bfloat16()
        lo, st = random_grid(torch.Generator().manual_seed(0), 2, 1, 64)
        with pytest.raises(ValueError, match="grid_index"):
            gc.pack_grid_codes(keys, torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                               torch.zeros(1, 1, 16, 16, dtype=torch.uint8), lo, st, page_size=16, impl="triton")
        with pytest.raises(ValueError, match="uint8"):
            gc.pack_grid_codes(keys, torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                               torch.zeros(1, 1, 16, 64, dtype=torch.uint8), lo[:1], st[:1], page_size=16)

    # ---------------------------------------------------------------------------- scores
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("agg", ["mean", "max", "softmax-mean"])
    @pytest.mark.parametrize("grp,d", [(3, 64), (4, 128)])
    def test_scores(dtype, agg, grp, d):
        """50 pages in blocks of 16 (the last block partial), 16 pages of P = 8 per tensor-core step."""
        for masked in (False, True):
            check_scores("cpu", dtype, grp, d, aggregation=agg, page=8, masked=masked, block_n=16, seed=grp + d)

    @pytest.mark.parametrize("grp,d,page,mode", [(3, 128, 32, "per_request"), (4, 64, 16, "index"),
                                                 (1, 64, 8, "one"), (4, 128, 256, "index")])
    def test_scores_grids_pages_and_blocks(grp, d, page, mode):
        """Per-request and indexed (strided) grids; pages of 32 (4 per step), 16 (8 per step) and 256 (one page
        of 256 rows per step); default block sizes and a block of 32 pages with 37 pages."""
        check_scores("cpu", torch.bfloat16, grp, d, page=page, grid_mode=mode, max_pages=37, masked=True,
                     block_n=32 if page != 256 else None, seed=7)

    @pytest.mark.parametrize("grp,d", [(3, 64), (4, 128)])
    @pytest.mark.parametrize("agg", ["mean", "max"])
    def test_scores_large_queries(grp, d, agg):
        """Queries 64 times standard normal: page scores in the hundreds, the bf16 bound scales with them."""
        out, ref = check_scores("cpu", torch.float16, grp, d, aggregation=agg, page=16, q_scale=LARGE_Q_SCALE,
                                grid_mode="per_request", seed=3)
        fin = torch.isfinite(ref)
        assert float(ref[fin].abs().max()) > 100

    def test_scores_head_major_codes_and_block_pages():
        """Codes stored head-major (``[Hkv, pages, P, D/4]`` seen through strides) and a smaller step (2 pages
        of 16): the same checks."""
        check_scores("cpu", torch.bfloat16, 4, 128, page=16, head_major=True, block_n=16, block_pages=2, seed=5)

    @pytest.mark.parametrize("agg", ["mean", "softmax-mean"])
    @pytest.mark.parametrize("grp,d", [(4, 128), (3, 64)])
    def test_scores_both_product_paths(agg, grp, d):
        """Products in bf16 (``int8=False``) and in int8 (the default; at head dim 64 two quarters per product,
        their codes interleaved): each matches its own numerics and the float32 reference."""
        for int8 in (False, True):
            check_scores("cpu", torch.bfloat16, grp, d, aggregation=agg, page=16, block_n=16, int8=int8, seed=11)

    def test_scores_refuse_bad_arguments():
        g = torch.Generator().manual_seed(1)
        q = torch.randn(2, 4, 64).bfloat16()
        codes = torch.zeros(10, 2, 16, 16, dtype=torch.uint8)
        lo, st = random_grid(g, 3, 2, 64)
        r2t = torch.zeros(3, 160, dtype=torch.int32)
        rows, n = torch.tensor([1, 2]), torch.tensor([100, 100], dtype=torch.int32)
        out = torch.empty(2, 2, 10)
        kw = dict(page_size=16, n_sink=1, n_window=1, aggregation="mean", impl="triton")
        with pytest.raises(ValueError, match="grid_index"):
            gc.score_pages_grid(q, codes, lo, st, r2t, rows, n, None, out, **kw)
        with pytest.raises(ValueError, match="block_pages"):
            gc.score_pages_grid(q, codes, lo[:1], st[:1], r2t, rows, n, None, out, block_n=16, block_pages=32, **kw)
        with pytest.raises(ValueError, match="lo/step"):
            gc.score_pages_grid(q, codes, lo[:1].double(), st[:1], r2t, rows, n, None, out, **kw)

    # ------------------------------------------------------------- fused score + select
    @pytest.mark.parametrize("dtype,grp,d,agg,k,masked,by_row,mode", [
        (torch.bfloat16, 3, 64, "mean", 4, True, False, "one"),
        (torch.float16, 4, 128, "max", 5, False, True, "index"),
        (torch.bfloat16, 4, 64, "mean", 16, True, True, "per_request"),
    ])
    def test_score_select_grid(dtype, grp, d, agg, k, masked, by_row, mode):
        """``score_and_select(grid=...)``: the fused path scoring from grid codes (default launch shape)."""
        check_score_select_grid("cpu", dtype, grp, d, k=k, aggregation=agg, masked=masked, by_row=by_row,
                                grid_mode=mode, seed=grp + k)

    def test_score_select_grid_shapes():
        """Blocks of 16 pages (3 blocks, 2 per program in a pipelined loop), the hysteresis margin, pages of 32
        (4 per tensor-core step), head-major codes, large queries, and softmax-mean (unfused path)."""
        check_score_select_grid("cpu", torch.bfloat16, 3, 64, k=4, block_n=16, blocks_per_program=2, num_stages=3)
        check_score_select_grid("cpu", torch.float16, 4, 64, k=4, margin=3, block_n=16, page=32, head_major=True)
        check_score_select_grid("cpu", torch.float16, 4, 128, k=4, q_scale=LARGE_Q_SCALE, grid_mode="per_request")
        check_score_select_grid("cpu", torch.bfloat16, 4, 128, k=4, block_n=16, int8=False)
        check_score_select_grid("cpu", torch.float16, 2, 64, k=4, block_n=16, int8=False)
        check_score_select_grid("cpu", torch.bfloat16, 3, 64, k=4, margin=2, aggregation="softmax-mean")
